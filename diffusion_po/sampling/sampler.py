"""The guided denoising loop over a stock diffusers pipeline.

    from diffusion_po.guidance import PerpNeg
    from diffusion_po.sampling import GuidedSampler
    images = GuidedSampler(pipe, guidance=PerpNeg(7.5))("a red circle and a blue square",
                                                         negative_prompt=[("red", 1.5)], seeds=[0, 1])

Per step: the latents are scaled once with the scheduler's `scale_model_input` (respected for every
scheduler; the NPO reference SD pipeline skips it, which is wrong for Euler-type schedulers), every
branch of every image goes through one batched forward (two when the negative model is a separate
network; an NPO LoRA shares the forward through mixed-adapter batches), the guidance combines the
branch predictions, and the scheduler steps. Each image has its own CPU generator seeded by its seed,
so an image depends only on its seed and settings, not on the batch it was generated in.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from diffusion_po.families import Conditioning, Family, cat_cond, family_for_pipeline, slice_cond
from diffusion_po.guidance import CFG, Branch, Guidance
from diffusion_po.sampling.negative import BASE_ADAPTER, NegativeModel, adapter_on_rows, mixed_adapter_batch
from diffusion_po.sampling.weights import checked_weight, parse_weighted

WeightedPrompts = Sequence[str | tuple[str, float]]


@dataclass
class PromptSpec:
    """One image request: the main prompt, weighted negatives and extra positives, and a seed."""

    prompt: str
    seed: int = 0
    negatives: list[tuple[str, float]] = field(default_factory=list)
    positives: list[tuple[str, float]] = field(default_factory=list)

    @property
    def structure(self) -> tuple[int, int]:
        return len(self.positives), len(self.negatives)


def weighted(prompts: WeightedPrompts | str | None) -> list[tuple[str, float]]:
    """Normalise "text", ["a", ("b", 1.5)] or None to [(text, weight)]; strings follow `parse_weighted`
    ("red:1.5" is red at 1.5; see `diffusion_po.sampling.weights`)."""
    if prompts is None:
        return []
    if isinstance(prompts, str):
        return [parse_weighted(prompts)]
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(parse_weighted(p))
        else:
            text, w = p
            out.append((str(text), checked_weight(w, str(text))))
    return out


@dataclass
class SamplingState:
    """Everything one batch's denoising loop carries between steps (exposed for benchmarks)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    branches: list[Branch]
    cond: Conditioning  # all branches' rows, branch-major: rows [k*B, (k+1)*B) are branch k
    on_negative: list[bool]  # per branch: computed by the negative model
    pos_weights: torch.Tensor
    neg_weights: torch.Tensor
    step_kwargs: dict[str, Any]
    extra: dict[str, Any]
    #: conditioning rows per group of branches, gathered once (the same at every step)
    group_cond: dict[tuple[int, ...], Conditioning] = field(default_factory=dict)


class GuidedSampler:
    """Sample from a stock diffusers pipeline with any `diffusion_po.guidance` method.

    pipe: a pipeline of any `diffusion_po.families` family (`StableDiffusionPipeline`,
    `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`, ...) or a `Family`. Prompts are encoded and
    the network is called through the family, exactly as in training. Any diffusers scheduler: set
    `pipe.scheduler` as usual.
    guidance: `CFG(scale)` by default, with the family's usual scale.
    negative_model: a `NegativeModel` (NPO) or None.
    batch_branches: False runs each branch in its own forward (the reference Perp-Neg's way, less memory).
    true_cfg: run CFG / negative prompts / Perp-Neg / NPO on a guidance-distilled checkpoint (FLUX.1-dev) as
    true-CFG branches (diffusers' `true_cfg_scale`); without it such a checkpoint takes only guidance scale 1.
    Families whose CFG is always true CFG (`uses_true_cfg`, e.g. FLUX.1-schnell) do not need it.
    """

    def __init__(
        self,
        pipe: Any,
        guidance: Guidance | None = None,
        negative_model: NegativeModel | None = None,
        batch_branches: bool = True,
        progress: bool = False,
        true_cfg: bool = False,
    ):
        self.family: Family = family_for_pipeline(pipe)
        self.true_cfg = bool(true_cfg)
        self.pipe = self.family.pipe
        self.guidance = guidance if guidance is not None else CFG(self.family.default_guidance_scale)
        if self.guidance.requires_negative_model and negative_model is None:
            raise ValueError(f"'{self.guidance.name}' guidance needs a negative model (an NPO LoRA or network)")
        self.negative_model = negative_model
        if negative_model is not None and negative_model.adapter is not None and negative_model.mixed == "rows":
            with adapter_on_rows(self.family.network, negative_model.adapter, 0, 0):
                pass  # validates: the adapter exists, is inactive and is plain LoRA
        self.batch_branches = batch_branches
        self.progress = progress

    # ------------------------------------------------------------------ public
    def __call__(
        self,
        prompt: str | Sequence[str | PromptSpec],
        negative_prompt: WeightedPrompts | str | None = None,
        *,
        positive_prompts: WeightedPrompts | None = None,
        seeds: Sequence[int] | int | None = None,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
    ) -> Any:
        """Generate one image per prompt (per `PromptSpec`); all in one batch.

        negative_prompt / positive_prompts apply to every plain-string prompt: "text" or
        [("text", weight), ...]. seeds: one per prompt, or a base seed (image i gets base + i); default 0.
        Returns a list of PIL images (output_type "pil"), or what `image_processor.postprocess` returns
        for "np"/"pt", or the final latents for "latent".
        """
        specs = self.specs(prompt, negative_prompt, positive_prompts, seeds)
        return self.sample_batch(specs, num_inference_steps, height, width, latents, eta, output_type)

    @staticmethod
    def specs(
        prompt: str | Sequence[str | PromptSpec],
        negative_prompt: WeightedPrompts | str | None = None,
        positive_prompts: WeightedPrompts | None = None,
        seeds: Sequence[int] | int | None = None,
    ) -> list[PromptSpec]:
        prompts = [prompt] if isinstance(prompt, (str, PromptSpec)) else list(prompt)
        if seeds is None:
            seeds = 0
        seed_list = [int(seeds) + i for i in range(len(prompts))] if isinstance(seeds, int) else [int(s) for s in seeds]
        if len(seed_list) != len(prompts):
            raise ValueError(f"got {len(seed_list)} seeds for {len(prompts)} prompts")
        negs, poss = weighted(negative_prompt), weighted(positive_prompts)
        out = []
        for p, s in zip(prompts, seed_list):
            if isinstance(p, PromptSpec):
                out.append(p)
            else:
                out.append(PromptSpec(str(p), s, list(negs), list(poss)))
        return out

    @torch.no_grad()
    def sample_batch(
        self,
        specs: list[PromptSpec],
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
    ) -> Any:
        """Run the whole loop for one batch of `PromptSpec`s (same numbers of negatives/positives)."""
        state = self.prepare(specs, num_inference_steps, height, width, latents, eta)
        steps = state.timesteps
        iterator = steps
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(steps, desc="denoising", leave=False)
        for t in iterator:
            state.latents = self.step(state, t)
        return self.family.decode(state.latents, output_type)

    # ------------------------------------------------------------------ internals
    def prepare(
        self,
        specs: list[PromptSpec],
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
    ) -> SamplingState:
        """Encode every branch's prompts, draw the latents, set the scheduler's timesteps."""
        if not specs:
            raise ValueError("no prompts to sample")
        structures = {s.structure for s in specs}
        if len(structures) != 1:
            raise ValueError("a batch must share the numbers of extra positives and negatives; use generate() to group")
        n_pos, n_neg = structures.pop()
        fam = self.family
        dh, dw = fam.default_size()
        height, width = int(height or dh), int(width or dw)
        multiple = fam.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        b = len(specs)
        branches = self.guidance.branches(n_pos, n_neg)
        fam.check_guidance(len(branches), self.true_cfg)

        # encode all prompt texts in one call (as training encodes them), the unconditional branch by the
        # family's empty-prompt policy (the stock pipeline's default negative)
        texts: list[str] = []
        spans: dict[Branch, tuple[int, int]] = {}
        for br in branches:
            if br.kind == "uncond":
                continue
            if br.kind == "pos":
                rows = [s.prompt if br.index == 0 else s.positives[br.index - 1][0] for s in specs]
            else:
                rows = [s.negatives[br.index][0] for s in specs]
            spans[br] = (len(texts), len(texts) + b)
            texts.extend(rows)
        encoded = fam.encode_prompts(texts, resolution=(height, width)) if texts else None
        per_branch = []
        for br in branches:
            if br.kind == "uncond":
                per_branch.append(fam.unconditional(b, resolution=(height, width)))
            else:
                per_branch.append(slice_cond(encoded, slice(*spans[br])))
        cond = cat_cond(per_branch)

        neg_kinds = set(self.negative_model.kinds) if self.negative_model else set()
        on_negative = [br.kind in neg_kinds for br in branches]
        if self.negative_model is not None and len(branches) > 1 and not any(on_negative):
            raise ValueError(
                f"the negative model computes none of the branches {[str(br) for br in branches]} "
                f"(its kinds are {list(self.negative_model.kinds)}): with a negative prompt, cfg/npo guidance "
                "uses it instead of the empty prompt, so the negative model must cover 'neg' too"
            )
        pos_w = torch.tensor([[w for _, w in s.positives] for s in specs], dtype=torch.float32).reshape(b, n_pos)
        neg_w = torch.tensor([[w for _, w in s.negatives] for s in specs], dtype=torch.float32).reshape(b, n_neg)
        if (neg_w < 0).any():
            raise ValueError("negative-prompt weights must be >= 0 (they are subtracted; give 1.5, not -1.5)")
        if isinstance(self.guidance, CFG) and n_neg == 1 and not torch.all(neg_w == 1):
            raise ValueError("'cfg' uses a single negative prompt in place of the empty prompt; its weight must be 1")

        generators = [torch.Generator("cpu").manual_seed(int(s.seed)) for s in specs]
        # timesteps first: `init_noise_sigma` (Euler-type schedulers) depends on the schedule
        steps = int(num_inference_steps or fam.default_steps)
        f = fam.vae_scale_factor
        latent_shape = (b, int(fam.network.config.in_channels), height // f, width // f)
        timesteps = fam.sampling_timesteps(steps, latent_shape, fam.device)
        if latents is not None:
            latents = latents.to(device=fam.device, dtype=fam.dtype)
        latents = fam.prepare_latents(b, height, width, generators, latents)  # scales by init_noise_sigma as stock
        extra: dict[str, Any] = {}
        proj = getattr(fam.network.config, "time_cond_proj_dim", None)
        if proj is not None and hasattr(self.pipe, "get_guidance_scale_embedding"):
            w = torch.tensor(self.guidance.scale - 1).repeat(b)
            extra["timestep_cond"] = self.pipe.get_guidance_scale_embedding(w, embedding_dim=proj).to(fam.device, fam.dtype)
        return SamplingState(
            latents=latents,
            timesteps=timesteps,
            branches=branches,
            cond=cond,
            on_negative=on_negative,
            pos_weights=pos_w.to(fam.device),
            neg_weights=neg_w.to(fam.device),
            step_kwargs=fam.scheduler_step_kwargs(generators, eta),
            extra=extra,
        )

    def predict_branches(self, state: SamplingState, x: torch.Tensor, t: torch.Tensor) -> dict[Branch, torch.Tensor]:
        """All branch predictions at (x, t): one forward per weight set (or per branch if not batched).

        With an NPO adapter, the negative-model branches go first so their rows form one contiguous
        block that the adapter is applied to (`adapter_on_rows`), or carry per-row adapter names (peft).
        """
        fam, nb, b = self.family, len(state.branches), x.shape[0]
        neg = self.negative_model
        on_neg = state.on_negative
        neg_idx = [i for i in range(nb) if on_neg[i]]
        pos_idx = [i for i in range(nb) if not on_neg[i]]

        def context(idx: list[int]):
            if neg is None or neg.adapter is None:
                return nullcontext()
            if neg.mixed == "peft":
                names = [neg.adapter if on_neg[i] else BASE_ADAPTER for i in idx for _ in range(b)]
                return mixed_adapter_batch(fam.network, names)
            k = sum(on_neg[i] for i in idx)  # negative branches come first in idx
            return adapter_on_rows(fam.network, neg.adapter, 0, k * b) if k else nullcontext()

        groups: list[tuple[torch.nn.Module, list[int]]] = []
        if neg is not None and neg.network is not None and neg_idx:
            if pos_idx:
                groups.append((fam.network, pos_idx))
            groups.append((neg.network, neg_idx))
        else:
            groups.append((fam.network, neg_idx + pos_idx))
        if not self.batch_branches:
            groups = [(net, [i]) for net, idx in groups for i in idx]

        preds: dict[Branch, torch.Tensor] = {}
        for net, idx in groups:
            key = tuple(idx)
            if key not in state.group_cond:
                rows = torch.cat([torch.arange(i * b, (i + 1) * b) for i in idx])
                state.group_cond[key] = {k: v[rows.to(v.device)] for k, v in state.cond.items()}
            cond = state.group_cond[key]
            x_in = x.repeat(len(idx), *([1] * (x.dim() - 1)))
            kw = {k: v.repeat(len(idx), *([1] * (v.dim() - 1))) for k, v in state.extra.items()}
            with context(idx) if net is fam.network else nullcontext():
                out = fam.predict(net, x_in, t, cond, **kw)
            for j, i in enumerate(idx):
                preds[state.branches[i]] = out[j * b : (j + 1) * b]
        return preds

    def step(self, state: SamplingState, t: torch.Tensor) -> torch.Tensor:
        """One denoising step: scale_model_input, all branches, guidance, scheduler step. Returns new latents."""
        sched = self.pipe.scheduler
        x = self.family.scale_model_input(state.latents, t)
        preds = self.predict_branches(state, x, t)
        guided = self.guidance.combine(preds, state.pos_weights, state.neg_weights)
        dtype = state.latents.dtype
        out = sched.step(guided.to(dtype), t, state.latents, **state.step_kwargs, return_dict=False)[0]
        return out.to(dtype)
