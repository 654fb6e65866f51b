"""Scorers on a transformers ``CLIPModel``: PickScore, CLIP score and the LAION aesthetic predictor v2.

Images are preprocessed with the PIL ``CLIPImageProcessor`` (PIL bicubic resize of the shortest edge,
centre crop, OpenAI mean/std), as the PickScore README and the aesthetic predictor do; in transformers
5 that is ``CLIPImageProcessorPil`` (the default ``CLIPImageProcessor`` there resizes tensors with
torchvision, which moves PickScore by about ±0.1).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusion_po.errors import ModelLoadError
from diffusion_po.eval.models import checkpoint_hash, resolve_dir, resolve_file
from diffusion_po.eval.scorers.base import Scorer, as_embedding, l2_normalize


def load_clip_model(path: Path, what: str) -> Any:
    """``CLIPModel.from_pretrained`` from a local folder, strictly: any missing, unexpected or
    mis-shaped weight is an error (transformers would otherwise random-initialise it silently)."""
    from transformers import CLIPModel

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{what}: {path} has no config.json; expected a transformers CLIPModel folder")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except ValueError as exc:
        raise ModelLoadError(f"{what}: {config_file} is not valid JSON") from exc
    if model_type != "clip":
        raise ModelLoadError(f"{what}: {path} holds a '{model_type}' model; expected a CLIPModel (model_type 'clip')")
    try:
        model, info = CLIPModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{what}: could not load the CLIP checkpoint in {path}: {first}") from exc
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        entries = [k for k in (info.get(key) or []) if not str(k).endswith("position_ids")]
        if entries:
            shown = ", ".join(str(e if isinstance(e, str) else e[0]) for e in list(entries)[:3])
            problems.append(f"{len(entries)} {key.replace('_', ' ')} (e.g. {shown})")
    if problems:
        raise ModelLoadError(
            f"{what}: the weights in {path} do not match its config: {'; '.join(problems)}. "
            "Wrong or truncated checkpoint?"
        )
    return model.eval().requires_grad_(False)


def load_pil_image_processor(path: Path, what: str) -> Any:
    """The PIL-based CLIP image processor (``CLIPImageProcessorPil`` in transformers 5)."""
    try:
        from transformers import CLIPImageProcessorPil as processor_cls  # transformers >= 5
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL/numpy implementation
        from transformers import CLIPImageProcessor as processor_cls
    if not (Path(path) / "preprocessor_config.json").is_file():
        raise ModelLoadError(f"{what}: {path} has no preprocessor_config.json (the CLIP image processor)")
    try:
        return processor_cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: could not load the image processor in {path}: {exc}") from exc


def load_tokenizer(path: Path, what: str) -> Any:
    """The CLIP tokenizer of a folder; its files must be there (transformers would build an empty one)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not (folder / "tokenizer.json").is_file() and not all((folder / f).is_file() for f in ("vocab.json", "merges.txt")):
        have = [f for f in ("tokenizer.json", "vocab.json", "merges.txt") if (folder / f).is_file()]
        raise ModelLoadError(
            f"{what}: {path} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt "
            f"(found {', '.join(have) or 'none of them'}); copy the tokenizer files of the model"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: could not load the tokenizer in {path}: {exc}") from exc


class HFImageTransform:
    """PIL image -> (3, H, W) tensor, the CLIP image processor's computation.

    For the standard CLIP settings (resize shortest edge with PIL bicubic, centre crop, rescale,
    normalise) the same steps are done here directly on the PIL image, which is several times faster
    than the processor call (tested equal to it); other settings go through the processor itself."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        size = dict(getattr(processor, "size", None) or {})
        crop = dict(getattr(processor, "crop_size", None) or {})
        resample = getattr(processor, "resample", None)
        self.fast = (
            bool(getattr(processor, "do_resize", False))
            and bool(getattr(processor, "do_center_crop", False))
            and bool(getattr(processor, "do_rescale", False))
            and bool(getattr(processor, "do_normalize", False))
            and bool(getattr(processor, "do_convert_rgb", True))
            and set(size) == {"shortest_edge"}
            and {"height", "width"} <= set(crop)
            and resample is not None
            and int(resample) == int(Image.BICUBIC)
        )
        if self.fast:
            self.shortest = int(size["shortest_edge"])
            self.crop = (int(crop["height"]), int(crop["width"]))
            self.scale = float(processor.rescale_factor)
            self.mean = np.asarray(processor.image_mean, dtype=np.float32)
            self.std = np.asarray(processor.image_std, dtype=np.float32)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.fast and image.mode == "RGB":  # other modes: the processor's own RGB conversion
            img = image
            w, h = img.size
            s = self.shortest
            nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
            ch, cw = self.crop
            if ch <= nh and cw <= nw:
                if (nw, nh) != (w, h):
                    img = img.resize((nw, nh), Image.BICUBIC)
                top, left = (nh - ch) // 2, (nw - cw) // 2
                arr = np.asarray(img.crop((left, top, left + cw, top + ch)), dtype=np.float32) * self.scale
                arr = (arr - self.mean) / self.std
                return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _slug(value: str | None, default: str) -> str:
    name = Path(str(value).rstrip("/")).name if value else default
    return name.lower()


class _HFClipScorer(Scorer):
    """Shared parts: a CLIPModel, its PIL processor and tokenizer, cached text features."""

    def _setup_clip(self, model_path: Path, processor_path: Path, what: str) -> None:
        self.model = load_clip_model(model_path, what).to(self.device)
        self.processor = load_pil_image_processor(processor_path, what)
        self.tokenizer = load_tokenizer(processor_path, what)
        self.transform_id = f"hf-clip-pil:{Path(processor_path).resolve()}"

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return HFImageTransform(self.processor)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        with self.autocast():
            return as_embedding(self.model.get_text_features(**tokens))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            feats = as_embedding(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        return l2_normalize(feats.float())

    def cosine(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        img = self.image_features(pixels)
        txt = self.cached_text_features(prompts, self.encode_text)
        return (img * txt).sum(-1)


class PickScoreScorer(_HFClipScorer):
    """PickScore v1: ``exp(logit_scale) * <t/|t|, i/|i|>`` (reported, ~20-23) and the raw cosine."""

    name = "pickscore"
    metrics = ("pickscore", "pickscore_cos")

    def __init__(
        self,
        checkpoint: str | None = None,
        processor: str | None = None,
        models_root: str | None = None,
        device: str | None = None,
        dtype: str = "fp32",
    ) -> None:
        super().__init__(device, dtype)
        path = resolve_dir("pickscore", checkpoint, models_root)
        processor_path = resolve_dir("laion_clip_h_processor", processor, models_root) if processor else path
        self._setup_clip(path, processor_path, self.name)
        self.checkpoint = str(path)
        self.checkpoint_hash = checkpoint_hash(path)
        self.version = f"pickscore-v1/readme-recipe transformers-{_transformers_version()}"

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        cos = self.cosine(pixels, prompts)
        scale = self.model.logit_scale.detach().float().exp()
        return {"pickscore": scale * cos, "pickscore_cos": cos}


class CLIPScoreScorer(_HFClipScorer):
    """CLIP score on a transformers CLIP backbone: ``100 * max(cos, 0)`` (torchmetrics convention) and the
    raw cosine, both with the backbone in the metric name (``clip_score@clip-vit-large-patch14``)."""

    name = "clip"

    def __init__(
        self,
        checkpoint: str | None = None,
        models_root: str | None = None,
        device: str | None = None,
        dtype: str = "fp32",
    ) -> None:
        super().__init__(device, dtype)
        path = resolve_dir("clip", checkpoint, models_root)
        self._setup_clip(path, path, self.name)
        backbone = _slug(checkpoint, "clip-vit-large-patch14")
        self.metrics = (f"clip_score@{backbone}", f"clip_cos@{backbone}")
        self.checkpoint = str(path)
        self.checkpoint_hash = checkpoint_hash(path)
        self.version = f"clip-score/torchmetrics-convention transformers-{_transformers_version()}"

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        cos = self.cosine(pixels, prompts)
        return {self.metrics[0]: 100.0 * cos.clamp_min(0.0), self.metrics[1]: cos}


# ---------------------------------------------------------------------------------------- aesthetic
_AESTHETIC_LINEAR = (0, 2, 4, 6, 7)  # nn.Sequential indices of the Linear layers; the rest are Dropouts


def build_aesthetic_mlp(input_size: int, hidden: Sequence[int] = (1024, 128, 64, 16)) -> torch.nn.Sequential:
    """The improved-aesthetic-predictor MLP: Linear/Dropout stack, no activations (they are commented out
    in the original), so the whole head is an affine map of the normalised CLIP embedding."""
    h1, h2, h3, h4 = hidden
    return torch.nn.Sequential(
        torch.nn.Linear(input_size, h1),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(h1, h2),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(h2, h3),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(h3, h4),
        torch.nn.Linear(h4, 1),
    )


def load_aesthetic_head(path: Path, expected_input: int | None = None) -> torch.nn.Sequential:
    """Load ``sac+logos+ava1-l14-linearMSE.pth`` (keys ``layers.{0,2,4,6,7}.{weight,bias}``) strictly."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"aesthetic: could not read {path} as a weights-only torch checkpoint: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"aesthetic: {path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = {f"layers.{i}.{p}" for i in _AESTHETIC_LINEAR for p in ("weight", "bias")}
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        unexpected = sorted(set(state) - expected)[:3]
        raise ModelLoadError(
            f"aesthetic: {path} is not an improved-aesthetic-predictor head "
            f"(missing {missing or 'none'}, unexpected {unexpected or 'none'})"
        )
    input_size = int(state["layers.0.weight"].shape[1])
    hidden = tuple(int(state[f"layers.{i}.weight"].shape[0]) for i in _AESTHETIC_LINEAR[:4])
    if expected_input is not None and input_size != expected_input:
        raise ModelLoadError(
            f"aesthetic: the head in {path} takes {input_size}-d embeddings but the CLIP backbone gives "
            f"{expected_input}-d ones; the v2 head needs CLIP ViT-L/14 (768-d)"
        )
    head = build_aesthetic_mlp(input_size, hidden)
    try:
        head.load_state_dict({k.replace("layers.", ""): v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"aesthetic: {path} has inconsistent layer shapes: {exc}") from exc
    return head.eval().requires_grad_(False)


class AestheticScorer(_HFClipScorer):
    """LAION aesthetic predictor v2: ``MLP(i / |i|)`` on the CLIP ViT-L/14 image embedding (1-10 scale)."""

    name = "aesthetic"
    metrics = ("aesthetic_v2",)

    def __init__(
        self,
        checkpoint: str | None = None,
        backbone: str | None = None,
        models_root: str | None = None,
        device: str | None = None,
        dtype: str = "fp32",
    ) -> None:
        super().__init__(device, dtype)
        head_path = resolve_file("aesthetic", checkpoint, models_root)
        clip_path = resolve_dir("clip", backbone, models_root)
        self._setup_clip(clip_path, clip_path, self.name)
        dim = int(self.model.config.projection_dim)
        self.head = load_aesthetic_head(head_path, expected_input=dim).to(self.device)
        self.checkpoint = f"{head_path} + {clip_path}"
        self.checkpoint_hash = checkpoint_hash(head_path, clip_path)
        self.version = f"laion-aesthetic-v2/sac+logos+ava1-l14-linearMSE transformers-{_transformers_version()}"

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        emb = self.image_features(pixels)
        return {"aesthetic_v2": self.head(emb).squeeze(-1)}
