"""Optional ImageReward scorer, on the official ``image-reward`` package (extra ``imagereward``).

The package is imported lazily, only when this scorer is built, so the core install never needs it.
It pins ``timm==0.6.13`` (unsatisfiable next to open_clip_torch 3) and breaks on transformers 5, so
it usually lives in its own environment; see docs/evaluation.md. Score =
``(MLP(BLIP_text_encoder_CLS(text, ViT-L image)) - 0.16717362830052426) / 1.0333394966054072``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from diffusion_po.errors import ModelLoadError
from diffusion_po.eval.models import checkpoint_hash, resolve_dir, resolve_file
from diffusion_po.eval.scorers.base import Scorer, check_checkpoint_covers
from diffusion_po.eval.scorers.openclip import OPENAI_MEAN, OPENAI_STD

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072


class ImageRewardTransform:
    """ImageReward's preprocessing: Resize(224, bicubic) -> CenterCrop(224) -> RGB -> tensor -> normalise."""

    def __init__(self, size: int = 224) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        image = TF.resize(image, self.size, interpolation=TF.InterpolationMode.BICUBIC)
        image = TF.center_crop(image, self.size)
        return TF.normalize(TF.to_tensor(image.convert("RGB")), OPENAI_MEAN, OPENAI_STD)


class ImageRewardScorer(Scorer):
    name = "imagereward"
    metrics = ("imagereward",)
    transform_id = "imagereward:224"

    def __init__(
        self,
        checkpoint: str | None = None,
        med_config: str | None = None,
        tokenizer: str | None = None,
        models_root: str | None = None,
        device: str | None = None,
        dtype: str = "fp32",
    ) -> None:
        super().__init__(device, dtype)
        try:
            import ImageReward as RM  # noqa: N814  (the package's own name)
        except Exception as exc:  # ImportError, or its broken imports (clip, timm, transformers 5)
            raise ModelLoadError(
                f"imagereward: the optional 'image-reward' package is not importable ({type(exc).__name__}: "
                f"{exc}). Install it with `pip install 'diffusion-po[imagereward]'` in a separate environment "
                "(it pins timm==0.6.13 and needs transformers<5); see docs/evaluation.md"
            ) from exc
        ckpt = resolve_file("imagereward", checkpoint, models_root, "ImageReward.pt")
        med = resolve_file("imagereward", med_config, models_root, "med_config.json")
        if tokenizer or models_root:
            # the package loads BertTokenizer('bert-base-uncased') by hub id; point it at local files
            tok_dir = resolve_dir("bert_base_uncased", tokenizer, models_root)
            import transformers

            original = transformers.BertTokenizer.from_pretrained

            def _local(name: str, *args, **kwargs):  # noqa: ANN202
                if name == "bert-base-uncased":
                    name = str(tok_dir)
                return original(name, *args, **kwargs)

            transformers.BertTokenizer.from_pretrained = _local  # type: ignore[method-assign]
        try:  # read here first: RM.load loads with strict=False, so a truncated file would load silently
            state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"imagereward: cannot read {ckpt} ({type(exc).__name__}: {exc}); "
                                 "download ImageReward.pt again") from exc
        if not isinstance(state, dict):
            raise ModelLoadError(f"imagereward: {ckpt} does not hold a state dict")
        self.model = RM.load(str(ckpt), device=str(self.device), med_config=str(med)).eval()
        check_checkpoint_covers(self.model, state, "imagereward", ckpt)
        self.checkpoint = str(ckpt)
        self.checkpoint_hash = checkpoint_hash(ckpt)
        version = getattr(RM, "__version__", "unknown")
        self.version = f"imagereward-v1.0 image-reward-{version}"

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return ImageRewardTransform(224)

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        blip = self.model.blip
        tokens = blip.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        ).to(self.device)
        with self.autocast():
            image_embeds = blip.visual_encoder(pixels.to(self.device))
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            out = blip.text_encoder(
                tokens.input_ids,
                attention_mask=tokens.attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                return_dict=True,
            )
        feats = out.last_hidden_state[:, 0, :].float()
        rewards = self.model.mlp(feats).squeeze(-1)
        return {"imagereward": (rewards - IMAGEREWARD_MEAN) / IMAGEREWARD_STD}
