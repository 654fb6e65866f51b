"""Where scorer weights come from: a local path, a `--models-root` folder, or the Hugging Face hub.

Resolution order for every scorer file or folder:

1. an explicit path or hub id given by the user (``--checkpoint NAME=PATH``);
2. ``<models_root>/<folder>`` when a models root is set (``--models-root`` or the
   ``DIFFUSION_PO_MODELS_ROOT`` environment variable): **no network call is ever made** then; a
   missing file is an error that names the expected path and the ``prefetch`` command;
3. the hub id, resolved from the local cache only when ``HF_HUB_OFFLINE=1`` (or
   ``TRANSFORMERS_OFFLINE=1``) is set, downloaded otherwise.

``prefetch`` downloads exactly the files listed in :data:`MODEL_FILES` into the flat layout of
``docs/evaluation.md``. Checkpoint hashes (sha256) identify the weights in score files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from diffusion_po.errors import ModelLoadError
from diffusion_po.hub import hub_offline, hub_reachable

MODELS_ROOT_ENV = "DIFFUSION_PO_MODELS_ROOT"


@dataclass(frozen=True)
class ModelFiles:
    """The files of one model: where they live on the hub and in the flat ``models_root`` layout."""

    key: str
    folder: str  # sub-folder of models_root
    files: tuple[str, ...]
    repo_id: str | None = None  # Hugging Face model repo
    urls: dict[str, str] = field(default_factory=dict)  # file -> direct URL for files not on the hub
    note: str = ""


MODEL_FILES: dict[str, ModelFiles] = {
    "pickscore": ModelFiles(
        "pickscore",
        "PickScore_v1",
        (
            "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
        ),
        repo_id="yuvalkirstain/PickScore_v1",
        note="CLIPModel (ViT-H/14) fine-tuned on Pick-a-Pic; ships its processor files",
    ),
    "laion_clip_h_processor": ModelFiles(
        "laion_clip_h_processor",
        "CLIP-ViT-H-14-laion2B-s32B-b79K",
        (
            "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt",
        ),
        repo_id="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        note="processor only: the PickScore README loads its processor from here (optional)",
    ),
    "hps_v2": ModelFiles(
        "hps_v2", "HPSv2", ("HPS_v2_compressed.pt",), repo_id="xswu/HPSv2",
        note="full open_clip ViT-H-14 state dict, fp16 (1.97 GB)",
    ),
    "hps_v2.1": ModelFiles(
        "hps_v2.1", "HPSv2", ("HPS_v2.1_compressed.pt",), repo_id="xswu/HPSv2",
        note="full open_clip ViT-H-14 state dict, fp16 (1.97 GB)",
    ),
    "clip": ModelFiles(
        "clip",
        "clip-vit-large-patch14",
        (
            "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
        ),
        repo_id="openai/clip-vit-large-patch14",
        note="CLIP score backbone (torchmetrics convention) and the aesthetic predictor's backbone",
    ),
    "clip_openclip": ModelFiles(
        "clip_openclip",
        "CLIP-ViT-H-14-laion2B-s32B-b79K",
        ("open_clip_config.json", "open_clip_model.safetensors"),
        repo_id="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        note="OpenCLIP ViT-H-14: CLIP cosine in the Diffusion-DPO / DRO convention",
    ),
    "aesthetic": ModelFiles(
        "aesthetic",
        "aesthetic",
        ("sac+logos+ava1-l14-linearMSE.pth",),
        urls={
            "sac+logos+ava1-l14-linearMSE.pth": "https://github.com/christophschuhmann/"
            "improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
        },
        note="LAION aesthetic predictor v2 head (3.7 MB); backbone = 'clip'",
    ),
    "imagereward": ModelFiles(
        "imagereward", "ImageReward", ("ImageReward.pt", "med_config.json"), repo_id="THUDM/ImageReward",
        note="optional metric (extra 'imagereward')",
    ),
    "bert_base_uncased": ModelFiles(
        "bert_base_uncased",
        "bert-base-uncased",
        ("vocab.txt", "tokenizer_config.json", "config.json"),
        repo_id="google-bert/bert-base-uncased",
        note="tokenizer for ImageReward",
    ),
}

# which file groups each scorer needs (for prefetch)
SCORER_FILES: dict[str, tuple[str, ...]] = {
    "pickscore": ("pickscore",),
    "hps_v2": ("hps_v2",),
    "hps_v2.1": ("hps_v2.1",),
    "clip": ("clip",),
    "clip_openclip": ("clip_openclip",),
    "aesthetic": ("aesthetic", "clip"),
    "imagereward": ("imagereward", "bert_base_uncased"),
    "toy": (),  # the toy world's oracle: no weights
}


def no_hub_access() -> bool:
    """True when the hub may not be used (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or does not answer:
    then only the local cache is read, so a missing file fails at once instead of after retries."""
    return hub_offline() or not hub_reachable()


def default_models_root(models_root: str | os.PathLike | None = None) -> Path | None:
    """The explicit ``models_root`` or ``$DIFFUSION_PO_MODELS_ROOT``; None when neither is set."""
    value = models_root if models_root not in (None, "") else os.environ.get(MODELS_ROOT_ENV)
    return Path(value).expanduser() if value else None


def _looks_like_hub_id(value: str) -> bool:
    return (
        not value.startswith((".", "/", "~"))
        and value.count("/") == 1
        and not value.endswith((".pt", ".pth", ".bin", ".safetensors", ".json"))
    )


def _prefetch_hint(spec: ModelFiles, root: Path | None) -> str:
    where = f"--models-root {root}" if root else "--models-root DIR"
    return f"run `diffusion-po eval prefetch {where} --metrics <metrics>` on a machine with network access"


def _hub_snapshot(repo_id: str, files: Iterable[str], what: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = no_hub_access()
    try:
        path = snapshot_download(repo_id, allow_patterns=list(files), local_files_only=offline)
    except Exception as exc:  # huggingface_hub raises several error types for missing/offline repos
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub is unreachable"
        hint = (
            f"{why} and it is not in the local cache"
            if offline
            else "the download failed"
        )
        raise ModelLoadError(
            f"{what}: could not get '{repo_id}' from the hub ({hint}: {detail}). Pass a local path, "
            "or use --models-root with files fetched by `diffusion-po eval prefetch`."
        ) from exc
    return Path(path)


def resolve_dir(key: str, override: str | None = None, models_root: str | os.PathLike | None = None) -> Path:
    """Local folder holding the model ``key`` (a Hugging Face model folder)."""
    spec = MODEL_FILES[key]
    root = default_models_root(models_root)
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            return path
        if path.exists():
            raise ModelLoadError(f"{key}: '{override}' is a file; expected a model folder (with config.json)")
        if root is not None and (root / override).is_dir():
            return root / override
        if not _looks_like_hub_id(override):
            raise ModelLoadError(f"{key}: model folder '{override}' does not exist (and is not a hub id org/name)")
        if root is not None:
            raise ModelLoadError(
                f"{key}: '{override}' is a hub id but --models-root ({root}) is set, which forbids "
                f"network access; put the files under {root / spec.folder} ({_prefetch_hint(spec, root)})"
            )
        return _hub_snapshot(override, ("*.json", "*.txt", "*.safetensors"), key)
    if root is not None:
        path = root / spec.folder
        if not path.is_dir():
            raise ModelLoadError(
                f"{key}: expected the model folder {path} (files: {', '.join(spec.files)}); "
                + _prefetch_hint(spec, root)
            )
        return path
    if spec.repo_id is None:
        raise ModelLoadError(f"{key}: no hub repository; pass a local path")
    return _hub_snapshot(spec.repo_id, spec.files, key)


def resolve_file(
    key: str, override: str | None = None, models_root: str | os.PathLike | None = None, filename: str | None = None
) -> Path:
    """Local path of the single checkpoint file of ``key`` (e.g. an HPS ``.pt`` or the aesthetic head)."""
    spec = MODEL_FILES[key]
    filename = filename or spec.files[0]
    root = default_models_root(models_root)
    if override:
        path = Path(override).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            if (path / filename).is_file():
                return path / filename
            raise ModelLoadError(f"{key}: '{override}' is a folder without {filename}")
        if root is not None and (root / override).is_file():
            return root / override
        raise ModelLoadError(f"{key}: checkpoint file '{override}' does not exist")
    if root is not None:
        path = root / spec.folder / filename
        if not path.is_file():
            raise ModelLoadError(f"{key}: expected the checkpoint {path}; " + _prefetch_hint(spec, root))
        return path
    if spec.repo_id is not None:
        from huggingface_hub import hf_hub_download

        offline = no_hub_access()
        try:
            return Path(hf_hub_download(spec.repo_id, filename, local_files_only=offline))
        except Exception as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelLoadError(
                f"{key}: could not get {spec.repo_id}/{filename} "
                f"({'offline and not cached' if offline else 'download failed'}: {detail}). "
                "Pass --checkpoint with a local path or use --models-root."
            ) from exc
    url = spec.urls.get(filename)
    if url is None:
        raise ModelLoadError(f"{key}: no download location for {filename}; pass a local path")
    import torch.hub

    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return cached
    if hub_offline():
        raise ModelLoadError(
            f"{key}: {filename} is not in {cached.parent} and HF_HUB_OFFLINE is set; pass a local path "
            "or use --models-root"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=True)
    except Exception as exc:
        raise ModelLoadError(f"{key}: could not download {url}: {exc}") from exc
    return cached


# --------------------------------------------------------------------------------------------- hashes
_LFS_BLOB = re.compile(r"^[0-9a-f]{64}$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _hash_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffusion_po" / "sha256.json"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file. Hub cache blobs are named by their sha256, which is used directly;
    other files are hashed once and remembered by (path, size, mtime)."""
    real = Path(os.path.realpath(path))
    if _LFS_BLOB.match(real.name) and real.parent.name == "blobs":
        return real.name
    stat = real.stat()
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = _hash_cache_path()
    cache: dict[str, str] = {}
    try:
        cache = json.loads(cache_file.read_text())
        if key in cache:
            return cache[key]
    except (OSError, ValueError):
        cache = {}
    digest = hashlib.sha256()
    with open(real, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    try:
        cache[key] = value
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return value


def checkpoint_hash(*paths: str | os.PathLike) -> str:
    """``sha256:<hex>`` identifying the weights in ``paths`` (files, or model folders whose weight files
    are hashed; with several files the digest of their names and digests)."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            weights = sorted(x for x in p.iterdir() if x.suffix in _WEIGHT_SUFFIXES and x.is_file())
            if (p / "model.safetensors").is_file():  # pytorch_model.bin beside it is a duplicate
                weights = [p / "model.safetensors"]
            files.extend(weights)
        elif p.is_file():
            files.append(p)
    if not files:
        return "sha256:unknown"
    if len(files) == 1:
        return "sha256:" + file_sha256(files[0])
    combined = hashlib.sha256()
    for f in files:
        combined.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return "sha256:" + combined.hexdigest()


# ------------------------------------------------------------------------------------------- prefetch
def prefetch_plan(scorers: Iterable[str], extra: Iterable[str] = ()) -> list[ModelFiles]:
    """The file groups needed by ``scorers`` (plus explicit extra keys), without duplicates."""
    keys: list[str] = []
    for name in scorers:
        if name not in SCORER_FILES:
            raise ModelLoadError(f"unknown metric '{name}'; choose from {', '.join(SCORER_FILES)}")
        keys.extend(SCORER_FILES[name])
    keys.extend(extra)
    seen: dict[str, ModelFiles] = {}
    for k in keys:
        if k not in MODEL_FILES:
            raise ModelLoadError(f"unknown model files '{k}'; choose from {', '.join(MODEL_FILES)}")
        seen.setdefault(k, MODEL_FILES[k])
    return list(seen.values())


def prefetch(
    models_root: str | os.PathLike, scorers: Iterable[str], extra: Iterable[str] = (), dry_run: bool = False
) -> list[tuple[str, Path]]:
    """Download the files the scorers need into ``models_root`` (flat layout). Returns (source, target)
    pairs; with ``dry_run`` only lists them."""
    root = Path(models_root).expanduser()
    plan: list[tuple[str, Path]] = []
    for spec in prefetch_plan(scorers, extra):
        for name in spec.files:
            source = spec.urls.get(name) or f"hf://{spec.repo_id}/{name}"
            plan.append((source, root / spec.folder / name))
    if dry_run:
        return plan
    if hub_offline():
        raise ModelLoadError("prefetch needs network access; unset HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE")
    from huggingface_hub import snapshot_download

    for spec in prefetch_plan(scorers, extra):
        target = root / spec.folder
        target.mkdir(parents=True, exist_ok=True)
        hub_files = [f for f in spec.files if f not in spec.urls]
        if hub_files and spec.repo_id:
            snapshot_download(spec.repo_id, allow_patterns=hub_files, local_dir=target)
        for name, url in spec.urls.items():
            if not (target / name).is_file():
                import torch.hub

                torch.hub.download_url_to_file(url, str(target / name), progress=True)
        missing = [f for f in spec.files if not (target / f).is_file()]
        if missing:
            import sys

            print(f"warning: {spec.repo_id or spec.key} did not provide {', '.join(missing)} "
                  f"(expected in {target})", file=sys.stderr)
    return plan
