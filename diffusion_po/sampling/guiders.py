"""Perp-Neg and NPO guidance as diffusers guiders (`diffusers.guiders.BaseGuidance`), for modular pipelines.

    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
    from diffusion_po.sampling.guiders import PerpNegGuidance

    pipe = StableDiffusionXLAutoBlocks().init_pipeline("stabilityai/stable-diffusion-xl-base-1.0")
    pipe.load_components(torch_dtype=torch.float16)
    pipe.update_components(guider=PerpNegGuidance(guidance_scale=7.5, negative_weight=1.5))
    image = pipe(prompt="a red circle and a blue square", negative_prompt="red", output="images")[0]

The math is `diffusion_po.guidance`'s (`perp_neg`, `npo_cfg`, `rescale_noise_cfg`); these classes only map
diffusers' per-branch batches onto it, so a modular pipeline gives the images `GuidedSampler` gives.

What a modular pipeline can express (its denoise step hands the guider one (prompt, negative prompt) pair
of inputs per image):

- `PerpNegGuidance`: one negative prompt (the pipeline's `negative_prompt`) with weight `negative_weight`;
  no extra positive prompts. Its third branch, the empty prompt eps_0, is built from zeros
  (SDXL's `force_zeros_for_empty_prompt`, set in SDXL base) unless `set_empty_prompt_inputs` gives the
  encoded empty prompt (needed for models that encode "" for real). Several weighted negatives or extra
  positives: use `GuidedSampler` / `diffusion-po sample`.
- `NPOGuidance`: the unconditional / negative-prompt branch runs with the negative model theta^- while the
  pipeline's network stays theta^+: an NPO LoRA adapter (`load_npo_lora`, the rows form) switched on for
  that branch only, or a separate network that replaces the network's output for that branch (it still
  computes the unused theta^+ forward of that branch: twice the cost of the adapter form).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from diffusion_po.guidance import npo_cfg, perp_neg, rescale_noise_cfg
from diffusion_po.sampling.negative import NegativeModel, adapter_on_rows

#: denoiser inputs that carry the prompt (zeroed for the empty prompt); others (time ids, ...) are the cond's
PROMPT_INPUTS = ("prompt_embeds", "text_embeds", "encoder_hidden_states", "pooled_projections")


class _TwoSidedGuidance(BaseGuidance):
    """Shared by our guiders: active between `start` and `stop` and unless the scale is 1; the batches in
    the order of `_input_predictions`, taken from diffusers' (cond, uncond) input tuples."""

    guidance_scale: float

    def _guidance_enabled(self) -> bool:
        if not self._enabled or math.isclose(self.guidance_scale, 1.0):
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    @property
    def num_conditions(self) -> int:
        return len(self._input_predictions) if self._guidance_enabled() else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    def _batches(self, pick: Any) -> list[Any]:
        """`pick(tuple_index, identifier)` -> one BlockState, for each prediction this step needs."""
        names = self._input_predictions[: self.num_conditions]
        return [pick(self._tuple_index(name), name) for name in names]

    def _tuple_index(self, name: str) -> int | None:
        return {"pred_cond": 0, "pred_uncond": 1}.get(name)

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[Any]:
        return self._batches(lambda idx, name: self._extra_batch(data, name) if idx is None
                             else self._prepare_batch(data, idx, name))

    def prepare_inputs_from_block_state(self, data: Any, input_fields: dict[str, str | tuple[str, str]]) -> list[Any]:
        def pick(idx: int | None, name: str) -> Any:
            if idx is not None:
                return self._prepare_batch_from_block_state(input_fields, data, idx, name)
            values = {key: tuple(getattr(data, f, None) for f in field) if isinstance(field, tuple)
                      else getattr(data, field, None) for key, field in input_fields.items()}
            return self._extra_batch(values, name)

        return self._batches(pick)

    def _extra_batch(self, data: dict[str, Any], name: str) -> Any:
        raise NotImplementedError


class PerpNegGuidance(_TwoSidedGuidance):
    """Perp-Neg (Armandpour et al. 2023) with the pipeline's negative prompt as the one negative:

        eps = eps_0 + s [ (eps_c - eps_0) - w perp(eps_neg - eps_0, eps_c - eps_0) ]

    Branches: `pred_cond` (the prompt), `pred_neg` (the negative prompt: diffusers' uncond input tuple slot),
    `pred_uncond` (the empty prompt eps_0, see the module docstring). `negative_weight` = w >= 0.
    """

    _input_predictions = ["pred_cond", "pred_neg", "pred_uncond"]
    ignore_for_config = ["empty_prompt_inputs"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        negative_weight: float = 1.0,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        empty_prompt_inputs: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__(start, stop, enabled)
        if negative_weight < 0:
            raise ValueError(f"negative_weight must be >= 0 (it is subtracted), got {negative_weight}")
        self.guidance_scale = guidance_scale
        self.negative_weight = negative_weight
        self.guidance_rescale = guidance_rescale
        self.empty_prompt_inputs = dict(empty_prompt_inputs or {})

    def set_empty_prompt_inputs(self, **inputs: torch.Tensor) -> None:
        """The encoded empty prompt under the denoiser input names (e.g. prompt_embeds=..., text_embeds=...);
        without it the prompt inputs of eps_0 are zeros."""
        self.empty_prompt_inputs = dict(inputs)

    def _tuple_index(self, name: str) -> int | None:
        return {"pred_cond": 0, "pred_neg": 1}.get(name)

    def _extra_batch(self, data: dict[str, Any], name: str) -> Any:
        from diffusers.modular_pipelines.modular_pipeline import BlockState

        batch: dict[str, Any] = {}
        for key, value in data.items():
            cond = value[0] if isinstance(value, tuple) else value
            if key in self.empty_prompt_inputs:
                given = self.empty_prompt_inputs[key]
                batch[key] = given.to(cond) if isinstance(cond, torch.Tensor) else given
            elif key in PROMPT_INPUTS and isinstance(cond, torch.Tensor):
                batch[key] = torch.zeros_like(cond)
            else:
                batch[key] = cond
        batch[self._identifier_key] = name
        return BlockState(**batch)

    def forward(self, pred_cond: torch.Tensor, pred_neg: torch.Tensor | None = None,
                pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if not self._guidance_enabled():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=None)
        weights = torch.tensor([self.negative_weight], dtype=torch.float32, device=pred_cond.device)
        pred = perp_neg(pred_uncond, [pred_cond], [pred_neg], self.guidance_scale, neg_weights=weights)
        pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred.to(pred_cond.dtype), pred_cond=pred_cond, pred_uncond=pred_uncond)


class NPOGuidance(_TwoSidedGuidance):
    """NPO guidance (Wang et al. 2025): CFG whose unconditional / negative-prompt branch is computed by the
    negative model theta^-: eps = eps_-(c_neg) + s (eps_+(c) - eps_-(c_neg)).

    negative_model: a `NegativeModel` from `load_npo_lora(pipe, ...)` (adapter, loaded inactive) or
    `load_negative_network(pipe, ...)` (a separate network). Not serialisable (weights are not config).
    """

    _input_predictions = ["pred_cond", "pred_uncond"]
    ignore_for_config = ["negative_model"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        negative_model: NegativeModel | None = None,
    ):
        super().__init__(start, stop, enabled)
        if negative_model is None:
            raise ValueError("NPOGuidance needs negative_model (load_npo_lora or load_negative_network)")
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.negative_model = negative_model
        self._switched: Any = None

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)
        if self._input_predictions[self._count_prepared - 1] != "pred_uncond":
            return
        if self.negative_model.adapter is not None:
            self._switched = adapter_on_rows(denoiser, self.negative_model.adapter, 0, sys.maxsize)
            self._switched.__enter__()
        else:
            network = self.negative_model.network
            self._switched = denoiser.register_forward_hook(
                lambda module, args, kwargs, output: network(*args, **kwargs), with_kwargs=True)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._switched is None:
            return
        if hasattr(self._switched, "__exit__"):
            self._switched.__exit__(None, None, None)
        else:
            self._switched.remove()
        self._switched = None

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if not self._guidance_enabled():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=None)
        pred = npo_cfg(pred_uncond, pred_cond, self.guidance_scale)
        pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred.to(pred_cond.dtype), pred_cond=pred_cond, pred_uncond=pred_uncond)


__all__ = ["NPOGuidance", "PerpNegGuidance"]
