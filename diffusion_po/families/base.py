"""The model-family interface: every family hides its conditioning quirks behind these few methods.

A family wraps a loaded diffusers pipeline. The trainer, the objectives' batch builders and the
samplers only ever call:

- `encode_prompts(prompts, original_sizes=None, crop_top_lefts=None)` -> `Conditioning`
- `encode_images(pixels, eps=None)` / `decode_latents(latents)`
- `sample_timesteps(n, generator)`, `noisy_latents(x0, noise, t)`, `training_target(x0, noise, t)`
- `predict(network, x_t, t, cond)` -> prediction in the same space as `training_target`
- `x0_from_prediction(x_t, prediction, t)`
- `save_lora(folder, network)` (with the LoRA config and the family name; see `check_lora_family`)

A `Conditioning` is a plain dict of batch-first tensors, so it can be concatenated, sliced and repeated
with the helpers below whatever the family puts in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from diffusion_po.errors import ModelLoadError

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
    """Base class: shared VAE and loading logic. Subclasses set `name`, `pipeline_class_names`, `network_name`."""

    name: ClassVar[str] = ""
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    network_name: ClassVar[str] = "unet"
    lora_layers_argument: ClassVar[str] = "unet_lora_layers"
    #: blocks that `compile: blocks` compiles one by one (regional compilation)
    repeated_blocks: ClassVar[tuple[str, ...]] = ("BasicTransformerBlock", "ResnetBlock2D")
    #: convolutional network: channels-last memory format helps
    convolutional: ClassVar[bool] = True
    #: conditioning keys that depend on the image (size, crop), not only on the prompt (see `row_conditioning`)
    row_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.vae = pipe.vae
        self.vae.requires_grad_(False)
        for enc in self.text_encoders:
            enc.requires_grad_(False)

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        vae_path: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        **kwargs: Any,
    ) -> Family:
        """Load by hub id or local folder through `DiffusionPipeline.from_pretrained` (one path for all)."""
        pipe = load_pipeline(path, vae_path=vae_path, revision=revision, variant=variant, **kwargs)
        return family_for_pipeline(pipe)

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
        return next(self.network.parameters()).device

    def to(self, device: torch.device | str, weight_dtype: torch.dtype = torch.float32, encoders: bool = True) -> Family:
        """Move frozen parts to `device` in `weight_dtype` (VAE stays fp32 where its config asks).
        `encoders=False` leaves the VAE and text encoders where they are (training from a data cache)."""
        vae_dtype = torch.float32 if getattr(self.vae.config, "force_upcast", False) else weight_dtype
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

    # ----------------------------------------------------------------- family-specific
    def encode_prompts(
        self,
        prompts: list[str],
        original_sizes: torch.Tensor | None = None,
        crop_top_lefts: torch.Tensor | None = None,
        resolution: int | None = None,
    ) -> Conditioning:
        raise NotImplementedError

    def row_conditioning(
        self,
        cond: Conditioning,
        original_sizes: torch.Tensor | None = None,
        crop_top_lefts: torch.Tensor | None = None,
        resolution: int | None = None,
    ) -> Conditioning:
        """Per-image parts of the conditioning (SDXL's size/crop ids) on top of cached prompt embeddings.

        `encode_prompts(p, sizes, crops, res)` == `row_conditioning(encode_prompts(p), sizes, crops, res)`.
        """
        return cond

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def noisy_latents(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, network: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def x0_from_prediction(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    # ----------------------------------------------------------------- saving
    def save_lora(self, folder: str | Path, network: torch.nn.Module | None = None) -> None:
        """Write `pytorch_lora_weights.safetensors` that `pipe.load_lora_weights(folder)` accepts."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        network = network if network is not None else self.network
        self._write_lora(folder, network, convert_state_dict_to_diffusers(get_peft_model_state_dict(network)))

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
    network = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    fam = family_for_pipeline_class(pipe)
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
    fam = family_for_pipeline_class(pipe)
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


def family_for_pipeline_class(pipe: Any) -> type[Family]:
    """The family class of a pipeline (without wrapping it)."""
    cls_name = type(pipe).__name__
    for fam in _FAMILIES.values():
        if cls_name in fam.pipeline_class_names:
            return fam
    supported = ", ".join(n for f in _FAMILIES.values() for n in f.pipeline_class_names)
    raise ModelLoadError(f"pipeline class {cls_name} is not supported; supported: {supported}")


def family_for_pipeline(pipe: Any) -> Family:
    cls_name = type(pipe).__name__
    for fam in _FAMILIES.values():
        if cls_name in fam.pipeline_class_names:
            return fam(pipe)
    supported = ", ".join(n for f in _FAMILIES.values() for n in f.pipeline_class_names)
    raise ModelLoadError(f"pipeline class {cls_name} is not supported; supported: {supported}")


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
    try:
        if vae_path:
            kwargs["vae"] = AutoencoderKL.from_pretrained(vae_path, revision=revision)
        pipe = DiffusionPipeline.from_pretrained(path, revision=revision, variant=variant, **kwargs)
    except (OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"could not load '{path}': {msg}. If it is a hub id, this machine may be offline "
            "(HF_HUB_OFFLINE) and the model not in the cache: download it once, or pass a local diffusers folder."
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe
