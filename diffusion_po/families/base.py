"""The model-family interface: every family hides its conditioning quirks behind these few methods.

A family wraps a loaded diffusers pipeline. The trainer, the objectives, the online rollouts and the
guided sampler (training and sampling alike) only ever call:

- `encode_prompts(prompts, original_sizes=None, crop_top_lefts=None, resolution=None)` -> `Conditioning`,
  `unconditional(n, resolution=None)` (the family's empty-prompt policy, chosen only here)
- `encode_images(pixels, eps=None)` / `decode_latents(latents)` (training) / `decode(latents)` (sampling)
- `alpha_sigma(t)`, `sample_timesteps(n, generator)`, `noisy_latents(x0, noise, t)`,
  `training_target(x0, noise, t)`, `x0_from_prediction(x_t, prediction, t)`
- `predict(network, x_t, t, cond, **extra)` -> prediction in the same space as `training_target`: the one
  network forward of training and sampling
- `default_size()`, `sampling_timesteps(...)`, `prepare_latents(...)`, `scale_model_input(x, t)`,
  `scheduler_step_kwargs(...)` (the stock pipeline's own parts, as its `__call__` uses them)
- `save_lora(folder, network)` (with the LoRA config and the family name; see `check_lora_family`),
  `lora_state_dict(network)`

`network_of(pipe)` and `family_class_for(pipe)` are the only places that decide which family a pipeline
is and which network it has.

A `Conditioning` is a plain dict of batch-first tensors, so it can be concatenated, sliced and repeated
with the helpers below whatever the family puts in it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffusion_po.errors import ConfigError, ModelLoadError
from diffusion_po.hub import hub_local_only
from diffusion_po.typed import coerce

Conditioning = dict[str, torch.Tensor]


def cat_cond(conds: list[Conditioning]) -> Conditioning:
    """Concatenate conditionings along the batch dimension."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def repeat_cond(cond: Conditioning, times: int) -> Conditioning:
    """[c; c; ...] along the batch dimension (as `Tensor.repeat`)."""
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in cond.items()}


def slice_cond(cond: Conditioning, index: slice | torch.Tensor) -> Conditioning:
    return {k: v[index] for k, v in cond.items()}


def cond_to(cond: Conditioning, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
    out = {}
    for k, v in cond.items():
        out[k] = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
    return out


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension of the squared error, in fp32 (a mean, not a sum)."""
    diff = prediction.float() - target.float()
    return diff.pow(2).mean(dim=tuple(range(1, diff.dim())))


class Family:
    """Base class: shared VAE, sampling and loading logic. Subclasses set `name`, `pipeline_class_names`,
    `network_name` and implement the prompt, schedule and forward methods."""

    name: ClassVar[str] = ""
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    network_name: ClassVar[str] = "unet"
    lora_layers_argument: ClassVar[str] = "unet_lora_layers"
    #: blocks that `compile: blocks` compiles one by one (regional compilation). UNets: the whole down, mid
    #: and up blocks (9 graphs at SD1.5 size, covering the transformer wrappers' norms and projections, the
    #: samplers and skip concatenations too), instead of every BasicTransformerBlock/ResnetBlock2D (19
    #: graphs, a third of the operations); tests/test_compile_graphs.py holds the counts.
    repeated_blocks: ClassVar[tuple[str, ...]] = ("CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
                                                  "CrossAttnUpBlock2D", "UpBlock2D")
    #: convolutional network: channels-last memory format helps
    convolutional: ClassVar[bool] = True
    #: conditioning keys that depend on the image (size, crop), not only on the prompt (see `row_conditioning`)
    row_keys: ClassVar[tuple[str, ...]] = ()
    #: sampling defaults of the stock pipeline
    default_steps: ClassVar[int] = 50
    default_guidance_scale: ClassVar[float] = 7.5
    #: CFG branches are "true CFG" (diffusers' `true_cfg_scale` convention; guidance-distilled models)
    uses_true_cfg: ClassVar[bool] = False
    #: T5 prompt length for training and sampling; None: the family has no T5 encoder
    default_max_sequence_length: ClassVar[int | None] = None
    #: options (attributes) that change what `encode_prompts` returns: the data cache's fingerprint holds them
    prompt_options: ClassVar[tuple[str, ...]] = ("max_sequence_length",)
    #: "epsilon" | "v_prediction" | "sample" | "flow"
    prediction_type: str = "epsilon"

    def __init__(self, pipe: Any, max_sequence_length: int | None = None):
        self.pipe = pipe
        self.vae = pipe.vae
        self.vae.requires_grad_(False)
        for enc in self.text_encoders:
            enc.requires_grad_(False)
        if max_sequence_length is not None and self.default_max_sequence_length is None:
            raise ConfigError(
                f"max_sequence_length applies to families with a T5 text encoder, not '{self.name}'; remove the key"
            )
        if max_sequence_length is not None and max_sequence_length <= 0:
            raise ConfigError(f"max_sequence_length must be positive, got {max_sequence_length}")
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length

    # ----------------------------------------------------------------- loading
    @classmethod
    def option_types(cls) -> dict[str, Any]:
        """The family's options (the keyword arguments of its constructors, e.g. SD3's `weighting`, FLUX's
        `guidance_scale`) and their annotations: what `family_options:` in a training config may set."""
        import typing

        types: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            init = vars(klass).get("__init__")
            if init is None or klass is object:
                continue
            hints = typing.get_type_hints(init)
            for name, param in inspect.signature(init).parameters.items():
                if name not in ("self", "pipe") and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                    types[name] = hints.get(name, Any)
        return types

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """`options` checked against `option_types` (names and types): a ConfigError naming the key and the
        family otherwise."""
        import difflib

        types = cls.option_types()
        for key in options:
            if key not in types:
                close = difflib.get_close_matches(key, list(types), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"family_options: '{key}' is not an option of the '{cls.name}' family "
                    f"({', '.join(cls.pipeline_class_names)}){hint}; its options: {', '.join(sorted(types))}"
                )
        return {k: coerce(v, types[k], f"family_options.{k}", f"family '{cls.name}'") for k, v in options.items()}

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        vae_path: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        max_sequence_length: int | None = None,
        options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Family:
        """Load by hub id or local folder through `DiffusionPipeline.from_pretrained` (one path for all);
        `options` (and `max_sequence_length`, one of them) go to the family (`family_for_pipeline`)."""
        pipe = load_pipeline(path, vae_path=vae_path, revision=revision, variant=variant, **kwargs)
        options = dict(options or {})
        if max_sequence_length is not None:
            options["max_sequence_length"] = max_sequence_length
        return family_for_pipeline(pipe, **options)

    # ----------------------------------------------------------------- parts
    @property
    def network(self) -> torch.nn.Module:
        return getattr(self.pipe, self.network_name)

    @network.setter
    def network(self, module: torch.nn.Module) -> None:
        self.pipe.register_modules(**{self.network_name: module})

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        encs = [getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        return [e for e in encs if e is not None]

    @property
    def device(self) -> torch.device:
        """Where the network runs (its offload hook's execution device, else its parameters' device)."""
        hook_device = getattr(getattr(self.network, "_hf_hook", None), "execution_device", None)
        return torch.device(hook_device) if hook_device is not None else next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def to(self, device: torch.device | str, weight_dtype: torch.dtype = torch.float32, encoders: bool = True,
           upcast_vae: bool = False) -> Family:
        """Move frozen parts to `device` in `weight_dtype` (VAE stays fp32 where its config asks, or with
        `upcast_vae`). `encoders=False` leaves the VAE and text encoders where they are (data cache)."""
        upcast = upcast_vae or getattr(self.vae.config, "force_upcast", False)
        vae_dtype = torch.float32 if upcast else weight_dtype
        if encoders:
            for module, dtype in [(self.vae, vae_dtype)] + [(enc, weight_dtype) for enc in self.text_encoders]:
                module.to(device) if module.dtype == dtype else module.to(device, dtype=dtype)
        self.network.to(device)
        return self

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (VAE factor, times the patch size of DiTs)."""
        return self.vae_scale_factor * int(getattr(self.network.config, "patch_size", None) or 1)

    # ----------------------------------------------------------------- images
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents. `eps` (latent-shaped) draws from the posterior; None takes its mean."""
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        latents = dist.mean if eps is None else dist.mean + dist.std * eps.to(dist.mean)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents.float() - shift) * self.vae.config.scaling_factor).float()

    def latent_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior, unscaled, for caching."""
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def scale_latents(self, raw: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (raw.float() - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1]."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        raw = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(raw.to(self.vae.device, self.vae.dtype)).sample.float().clamp(-1, 1)

    # ----------------------------------------------------------------- prompts (training and sampling)
    def encode_prompts(
        self,
        prompts: list[str],
        original_sizes: torch.Tensor | None = None,
        crop_top_lefts: torch.Tensor | None = None,
        resolution: int | tuple[int, int] | None = None,
    ) -> Conditioning:
        """fp32 batch-first conditioning of `prompts`; `resolution` (int or (h, w)) is the target size."""
        raise NotImplementedError

    def unconditional(self, n: int, resolution: int | tuple[int, int] | None = None) -> Conditioning:
        """The unconditional embedding of `n` rows: the one place the family's empty-prompt policy lives
        (what the stock pipeline's CFG uses without a negative prompt). Default: "" encoded."""
        return self.encode_prompts([""] * n, resolution=resolution)

    def row_conditioning(
        self,
        cond: Conditioning,
        original_sizes: torch.Tensor | None = None,
        crop_top_lefts: torch.Tensor | None = None,
        resolution: int | tuple[int, int] | None = None,
    ) -> Conditioning:
        """Per-image parts of the conditioning (SDXL's size/crop ids) on top of cached prompt embeddings.

        `encode_prompts(p, sizes, crops, res)` == `row_conditioning(encode_prompts(p), sizes, crops, res)`.
        """
        return cond

    # ----------------------------------------------------------------- schedule and targets
    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) of x_t = alpha x0 + sigma eps per sample, fp32, shaped to broadcast against
        `like` (and on its device), or 1-D on t's device without it."""
        raise NotImplementedError

    @staticmethod
    def _shaped(a: torch.Tensor, s: torch.Tensor, like: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if like is None:
            return a, s
        shape = (-1,) + (1,) * (like.dim() - 1)
        return a.view(shape), s.view(shape)

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma weights of the per-sample errors at timesteps `t` (Hang et al. 2023; diffusers'
        `compute_snr` and `--snr_gamma`), SNR = alpha_t^2 / sigma_t^2: min(SNR, gamma) / SNR for epsilon
        targets (1 where SNR is 0, its limit), min(SNR, gamma) / (SNR + 1) for v_prediction, min(SNR, gamma)
        for sample. 1-D fp32 on t's device. Flow matching has no such weighting here (a ValueError)."""
        a, s = self.alpha_sigma(t)
        snr = (a / s) ** 2
        clipped = torch.clamp(snr, max=gamma)
        if self.prediction_type == "epsilon":
            return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        if self.prediction_type == "sample":
            return clipped
        raise ValueError(f"min-SNR weighting is not defined for prediction_type '{self.prediction_type}'")

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def noisy_latents(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x0)
        return a * x0.float() + s * noise.float()

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def x0_from_prediction(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------- the network forward
    def predict(
        self, network: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, **extra: Any
    ) -> torch.Tensor:
        """The network's raw prediction at (x_t, t) for training and sampling alike. x_t: unpacked latents
        (B, C, h, w); t: scheduler timesteps (0-d or (B,)); `extra`: sampler-only inputs (`timestep_cond`)."""
        raise NotImplementedError

    @staticmethod
    def _forward_dtype(network: torch.nn.Module, x_t: torch.Tensor) -> torch.dtype:
        """The network's weight dtype, or the input's under autocast."""
        return next(network.parameters()).dtype if not torch.is_autocast_enabled() else x_t.dtype

    # ----------------------------------------------------------------- sampling (the stock pipeline's parts)
    def default_size(self) -> tuple[int, int]:
        size = getattr(self.pipe, "default_sample_size", None) or self.network.config.sample_size
        return int(size) * self.vae_scale_factor, int(size) * self.vae_scale_factor

    def _timestep_kwargs(self, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """Extra arguments of `retrieve_timesteps` (the resolution shift `mu` of flow families)."""
        return {}

    def sampling_timesteps(
        self, num_steps: int, latent_shape: tuple[int, ...], device: torch.device | None = None
    ) -> torch.Tensor:
        """Set the pipeline scheduler's inference timesteps as the stock pipeline does; returns them."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        sched = self.pipe.scheduler
        timesteps, _ = retrieve_timesteps(sched, num_steps, device or self.device, **self._timestep_kwargs(latent_shape))
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
        return timesteps

    def prepare_latents(
        self,
        n: int,
        height: int,
        width: int,
        generators: list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial (unpacked) latents drawn as the stock pipeline draws them (init_noise_sigma included)."""
        channels = int(self.network.config.in_channels)
        return self.pipe.prepare_latents(n, channels, height, width, self.dtype, self.device, generators, latents)

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sched = self.pipe.scheduler
        return sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x

    def scheduler_step_kwargs(self, generators: list[torch.Generator] | None, eta: float) -> dict[str, Any]:
        params = inspect.signature(self.pipe.scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generators
        return kwargs

    def check_guidance(self, n_branches: int, true_cfg: bool) -> None:
        """Refuse guidance this checkpoint cannot take as asked (a guidance-distilled FLUX.1-dev needs
        `true_cfg` for more than one branch). Default: anything goes."""

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> VAE latents (latents_mean/std, or shift/scale factors)."""
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean_t = torch.tensor(mean).view(1, c, 1, 1).to(latents)
            std_t = torch.tensor(std).view(1, c, 1, 1).to(latents)
            return latents * std_t / cfg.scaling_factor + mean_t
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return latents / cfg.scaling_factor + shift

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> Any:
        """Sampled latents -> images through the pipeline's postprocess (fp16 VAEs upcast as stock)."""
        if output_type == "latent":
            return latents
        vae = self.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(dtype=torch.float32)
        raw = self.unscale_latents(latents).to(device=vae.device, dtype=vae.dtype)
        image = vae.decode(raw, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return self.pipe.image_processor.postprocess(image, output_type=output_type)

    # ----------------------------------------------------------------- saving
    def lora_state_dict(self, network: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The network's LoRA weights under the names `save_lora` writes."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(network if network is not None else self.network))

    def save_lora(self, folder: str | Path, network: torch.nn.Module | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> None:
        """Write `pytorch_lora_weights.safetensors` that `pipe.load_lora_weights(folder)` accepts; `state`: weights
        from `lora_state_dict` (e.g. a host copy taken earlier) instead of the network's current ones."""
        network = network if network is not None else self.network
        state = state if state is not None else self.lora_state_dict(network)
        self._write_lora(folder, network, state)

    def _write_lora(self, folder: str | Path, network: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Save `state` with the adapter's LoraConfig as diffusers' training examples do
        (`<network>_lora_adapter_metadata`: rank, lora_alpha, target modules, so stock loaders apply
        lora_alpha / r) and this family's name in the file header (see `check_lora_family`)."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        metadata = {f"{self.lora_layers_argument.removesuffix('_layers')}_adapter_metadata":
                    network.peft_config["default"].to_dict()}
        type(self.pipe).save_lora_weights(str(folder), **{self.lora_layers_argument: state}, **metadata,
                                          safe_serialization=True)
        file = Path(folder) / LORA_WEIGHT_FILE
        with safe_open(str(file), "pt") as f:
            header = dict(f.metadata() or {})
        save_file(load_file(str(file)), str(file), metadata={**header, LORA_FAMILY_KEY: self.name})


def compile_regions(module: torch.nn.Module, block_names: list[str] | tuple[str, ...], **kwargs: Any) -> int:
    """Regional compilation: `torch.compile` every submodule whose class name is in `block_names`
    (what diffusers' `compile_repeated_blocks` does, for any list of blocks). Returns how many.

    Compiling a block in place keeps the module tree (state dicts, LoRA adapters, saving) unchanged; a
    deep copy of the network is not compiled (`nn.Module` drops the compiled call when copied).
    """
    n = 0
    for sub in module.modules():
        if type(sub).__name__ in block_names:
            sub.compile(**kwargs)
            n += 1
    return n


def raise_compile_limits(per_code: int = 128, total: int = 2048) -> None:
    """Room for one compiled graph per distinct block shape, grad mode and dtype (dynamo stops at 8)."""
    import torch._dynamo as dynamo

    for name, value in (("recompile_limit", per_code), ("cache_size_limit", per_code),
                        ("accumulated_recompile_limit", total), ("accumulated_cache_size_limit", total)):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), value))


def speed_up_for_sampling(pipe: Any, compile: bool = True, channels_last: bool | None = None,
                          mode: str | None = None) -> dict[str, Any]:
    """Make a pipeline's denoising network faster for sampling, in place: channels-last (UNets; default on
    CUDA) and regional compilation of its repeated blocks. Works with stock `pipe(...)` calls and with
    `diffusion_po.sampling`. Returns what was done. The first call of each new shape compiles (seconds)."""
    network = network_of(pipe)
    fam = family_class_for(pipe)
    device = next(network.parameters()).device
    done: dict[str, Any] = {"channels_last": False, "compiled_blocks": 0}
    if channels_last is None:
        channels_last = device.type == "cuda"
    if channels_last and fam.convolutional:
        network.to(memory_format=torch.channels_last)
        done["channels_last"] = True
    if compile:
        raise_compile_limits()
        kwargs = {"mode": mode} if mode else {}
        done["compiled_blocks"] = compile_regions(network, fam.repeated_blocks, **kwargs)
    return done


#: the file `save_lora` writes, and the header key naming the family it was saved for
LORA_WEIGHT_FILE = "pytorch_lora_weights.safetensors"
LORA_FAMILY_KEY = "diffusion_po_family"


def check_lora_family(pipe: Any, path: str | Path, what: str = "LoRA") -> None:
    """Stop with a ModelLoadError naming both families when the LoRA at `path` (a folder or .safetensors
    file) was saved for another family than `pipe`'s: by the family name `save_lora` writes in the file
    header, else by the network its keys address (unet.* / transformer.*). Hub ids are not checked here."""
    from safetensors import safe_open

    p = Path(path)
    file = p if p.is_file() else p / LORA_WEIGHT_FILE
    if not file.is_file() or file.suffix != ".safetensors":
        return
    fam = family_class_for(pipe)
    try:
        with safe_open(str(file), "pt") as f:
            saved = (f.metadata() or {}).get(LORA_FAMILY_KEY)
            prefixes = {k.split(".", 1)[0] for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelLoadError(f"{what} '{path}': cannot read {file.name} ({str(exc).splitlines()[0]})") from exc
    if saved is None:
        networks = prefixes & {f.network_name for f in _FAMILIES.values()}
        if networks and fam.network_name not in networks:
            saved = "/".join(f.name for f in _FAMILIES.values() if f.network_name in networks)
    if saved is not None and saved != fam.name:
        raise ModelLoadError(
            f"{what} '{path}' was saved for the {saved} family, but the model is {fam.name} "
            f"({type(pipe).__name__}): load it into a {saved} model"
        )


_FAMILIES: dict[str, type[Family]] = {}


def register_family(cls: type[Family]) -> type[Family]:
    _FAMILIES[cls.name] = cls
    return cls


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def _supported() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.pipeline_class_names)})" for f in _FAMILIES.values())


def family_class_for(pipe: Any) -> type[Family]:
    """The family class of a pipeline (or a Family): by class name, then by its base classes."""
    if isinstance(pipe, Family):
        return type(pipe)
    by_class = {n: fam for fam in _FAMILIES.values() for n in fam.pipeline_class_names}
    for cls in type(pipe).__mro__:
        if cls.__name__ in by_class:
            return by_class[cls.__name__]
    raise ModelLoadError(
        f"pipeline class {type(pipe).__name__} is not supported; supported families: {_supported()}"
    )


def network_of(pipe: Any) -> torch.nn.Module:
    """The denoising network (UNet or transformer) of a pipeline or a Family."""
    if isinstance(pipe, Family):
        return pipe.network
    return getattr(pipe, family_class_for(pipe).network_name)


def family_for_pipeline(pipe: Any, **options: Any) -> Family:
    """Wrap a pipeline in its family (a Family passes through). `options`: the family's options
    (`Family.option_types`, e.g. `max_sequence_length`, SD3's `weighting`, FLUX's `guidance_scale`), checked by
    `Family.check_options`; None values are left to the family's default."""
    if isinstance(pipe, Family):
        return pipe
    cls = family_class_for(pipe)
    options = {k: v for k, v in options.items() if v is not None}
    return cls(pipe, **cls.check_options(options))


def load_pipeline(
    path: str,
    vae_path: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    **kwargs: Any,
) -> Any:
    """`DiffusionPipeline.from_pretrained` with clear errors for a missing folder or an offline hub id."""
    import json

    from diffusers import AutoencoderKL, DiffusionPipeline

    local = Path(path)
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            trained = [n for n in ("unet", "transformer") if (local / n / "config.json").is_file()]
            if trained:
                raise ModelLoadError(
                    f"{path}: a trained {trained[0]} without a pipeline (a full fine-tune's output_dir): give the "
                    f"base model as --model and this folder as --network, or train with save_full_pipeline: true"
                )
            raise ModelLoadError(f"{path}: no model_index.json; expected a diffusers pipeline folder")
        spec = json.loads(index.read_text())
        # optional components saved as [null, null] (e.g. SD3 without T5) must be passed explicitly
        for key, value in spec.items():
            if isinstance(value, list) and value == [None, None] and key not in kwargs:
                kwargs[key] = None
        if "safety_checker" in spec and "safety_checker" not in kwargs:
            kwargs["safety_checker"] = None
    elif path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelLoadError(f"model path '{path}' does not exist (and is not a hub id of the form org/name)")
    kwargs.setdefault("local_files_only", hub_local_only(path, revision))
    try:
        if vae_path:
            kwargs["vae"] = AutoencoderKL.from_pretrained(
                vae_path, revision=revision, local_files_only=hub_local_only(vae_path, revision, "VAE"))
        pipe = DiffusionPipeline.from_pretrained(path, revision=revision, variant=variant, **kwargs)
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"could not load '{path}': {msg}. If it is a hub id, this machine may be offline "
            "(HF_HUB_OFFLINE) and the model not in the cache: download it once, or pass a local diffusers folder."
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe
