"""Preference data loading (Pick-a-Pic, local pairs, DCPO, images, prompts) and caching."""

from diffusion_po.data.preference import BadRow, TrainData, build_train_data, collate, decode_image, load_rows

__all__ = ["BadRow", "TrainData", "build_train_data", "collate", "decode_image", "load_rows"]
