"""The encoded-data cache: encode a data set once, train from it many times.

`diffusion-po data cache CONFIG` decodes every row exactly as training would (same resize, crop and
winner/loser order), runs the VAE once per image (and once per mirrored image when `data.random_flip`
is on) and the text encoders once per distinct caption, and writes sharded safetensors:

    <data.cache_dir>/<model key>/<resolution>px/
        cache.json                 what was encoded, with which model, how (see `CacheMeta`)
        index.safetensors          per cached row: row id, label_0, shard, offset (-1 = a bad row)
        rows-00000.safetensors     VAE posterior mean and std (unscaled) of each image, caption ids, sizes
        prompts-00000.safetensors  the conditioning of each distinct caption (and of "" for prompt dropout)
        prompts.json               the captions, in prompt-id order

The model key is the model's name and a fingerprint of its VAE, text encoders and tokenizers, so a
cache is used only with the very encoders that made it (a fine-tuned UNet on the same base shares it).

Training with `data.format: cache` gives the same batches, in the same order, as training from the files:
the same sampler, the same bad rows, ties, flips (drawn from the same per-row seed) and latent draws
(`mean + std * eps` with the trainer's noise), so the loss is the same up to float rounding of the
stored tensors (`--dtype fp32` for bit-faithful latents; fp16 halves the disk).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from diffusion_po.config import (
    DataConfig,
    TrainConfig,
    default_num_workers,
    family_options_of,
    weight_dtype_of,
)
from diffusion_po.data.preference import (
    PAIRED_FORMATS,
    BadRow,
    RowDecoder,
    TrainData,
    _expand_files,
    _GlobalBatchSampler,
    load_rows,
)
from diffusion_po.errors import DataError, UserError

CACHE_VERSION = 1
META_FILE = "cache.json"
INDEX_FILE = "index.safetensors"
PROMPTS_FILE = "prompts.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHARD_BYTES = 256 * 2**20
CACHEABLE_FORMATS = ("pickapic", "pairs", "dcpo", "images", "prompts")


# ----------------------------------------------------------------------------- identity
def fingerprint(family: Any) -> str:
    """A short hash of what the cache depends on: the family, the VAE and text encoders (configs and a
    strided sample of every weight, rounded to bf16 so fp32 and bf16 copies agree) and the tokenizers."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{family.name}".encode())
    for option in family.prompt_options:  # e.g. the T5 prompt length: cached embeddings depend on it
        value = getattr(family, option, None)
        if value:
            h.update(f"{option}:{value}".encode())
    modules = [("vae", family.vae)] + [(f"text_encoder_{i}", enc) for i, enc in enumerate(family.text_encoders)]
    for name, module in modules:
        h.update(name.encode())
        config = getattr(module, "config", None)
        if config is not None:
            items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            keep = {k: v for k, v in items.items() if not k.startswith("_") and k not in ("torch_dtype", "dtype")
                    and not k.endswith("_version")}
            h.update(json.dumps(keep, sort_keys=True, default=str).encode())
        for pname, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            sample = flat[::step][:64].to("cpu", torch.float32).to(torch.bfloat16).float()
            h.update(f"{pname}{tuple(tensor.shape)}".encode())
            h.update(sample.numpy().tobytes())
    for attr in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(family.pipe, attr, None)
        if tok is not None:
            h.update(f"{attr}:{type(tok).__name__}:{len(tok)}:{getattr(tok, 'model_max_length', '')}".encode())
    return h.hexdigest()[:16]


def _slug(text: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", text.rstrip("/\\")) if p][-2:]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", "--".join(parts)).strip("-.")
    return slug[:60] or "model"


def model_key(model: str, fp: str) -> str:
    """The folder name of a model's caches: `<last two parts of the model path>-<fingerprint>`."""
    return f"{_slug(model)}-{fp[:12]}"


def cache_folder(root: str | Path, model: str, fp: str, resolution: int) -> Path:
    return Path(root) / model_key(model, fp) / f"{resolution}px"


@dataclasses.dataclass
class CacheMeta:
    """The contents of `cache.json`."""

    version: int
    model: str
    fingerprint: str
    family: str
    resolution: int
    source_format: str
    source: str
    dtype: str
    flips: bool
    drop_ties: bool
    reverse_labels: bool
    center_crop: bool
    num_rows: int
    num_prompts: int
    latent_shape: list[int]
    cond_keys: dict[str, list[int]]
    row_shards: list[str]
    prompt_shards: list[list[Any]]  # [file, first prompt id, count]
    bad_rows: dict[str, str]
    encode_precision: str
    seconds: float
    created: str

    @classmethod
    def read(cls, folder: Path) -> CacheMeta:
        path = folder / META_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a readable data cache ({exc}); re-run `diffusion-po data cache`") from exc
        if data.get("version") != CACHE_VERSION:
            raise DataError(f"{folder}: cache version {data.get('version')} is not {CACHE_VERSION}; "
                            "re-run `diffusion-po data cache` with this version")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def describe(self) -> str:
        return f"model {self.model} (encoders {self.fingerprint}) at {self.resolution} px"


# ----------------------------------------------------------------------------- writing
def _source_data_config(data: DataConfig, source_format: str | None) -> DataConfig:
    fmt = source_format or data.format
    if fmt == "cache":
        raise UserError("data.format is 'cache': say which files the cache is made from with --format "
                        f"({', '.join(CACHEABLE_FORMATS)}) or set data.format to the source format")
    if fmt not in CACHEABLE_FORMATS:
        raise UserError(f"cannot cache data.format '{fmt}'; choose one of {', '.join(CACHEABLE_FORMATS)}")
    if data.random_crop or not data.center_crop:
        raise UserError("the cache stores one crop per image: set data.random_crop: false and data.center_crop: "
                        "true, or train from the image files")
    if data.streaming:
        raise UserError("data cache reads the whole data set; set data.streaming: false")
    return dataclasses.replace(data, format=fmt)


class _ShardWriter:
    """Accumulate row tensors and write `<prefix>-NNNNN.safetensors` shards of about SHARD_BYTES."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix = folder, prefix
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.rows = 0
        self.bytes = 0
        self.files: list[str] = []

    @property
    def shard(self) -> int:
        return len(self.files)

    def add(self, tensors: dict[str, torch.Tensor]) -> int:
        """Append rows (all tensors share the first dimension); returns the offset of the first in the shard."""
        first = self.rows
        n = next(iter(tensors.values())).shape[0]
        for key, value in tensors.items():
            self.parts.setdefault(key, []).append(value.detach().cpu().contiguous())
            self.bytes += value.numel() * value.element_size()
        self.rows += n
        return first

    def full(self) -> bool:
        return self.bytes >= SHARD_BYTES

    def flush(self) -> None:
        if not self.rows:
            return
        from safetensors.torch import save_file

        name = f"{self.prefix}-{self.shard:05d}.safetensors"
        save_file({k: torch.cat(v) for k, v in self.parts.items()}, str(self.folder / name))
        self.files.append(name)
        self.parts, self.rows, self.bytes = {}, 0, 0


@torch.no_grad()
def write_cache(
    cfg: TrainConfig,
    source_format: str | None = None,
    output: str | Path | None = None,
    batch_size: int = 8,
    dtype: str = "fp16",
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Encode the data set of `cfg` into a cache; returns the cache folder.

    output: the cache root (default `cfg.data.cache_dir`); the cache goes to `<root>/<model key>/<res>px`.
    The VAE and text encoders run in `cfg.mixed_precision` as in training; tensors are stored in `dtype`.
    """
    from diffusion_po.families import load_family

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    if cfg.data.aspect_buckets:
        raise UserError("data.aspect_buckets: the data cache holds square `resolution` crops only; set "
                        "data.aspect_buckets: false to cache, or train with buckets from the image files")
    data = _source_data_config(cfg.data, source_format)
    root = output or cfg.data.cache_dir
    if not root:
        raise UserError("no cache folder: set data.cache_dir in the config or pass --output")
    started = time.perf_counter()
    family = load_family(cfg.pretrained_model_name_or_path, cfg.pretrained_vae_model_name_or_path,
                         cfg.revision, cfg.variant, options=family_options_of(cfg))
    fp = fingerprint(family)
    folder = cache_folder(root, cfg.pretrained_model_name_or_path, fp, cfg.resolution)
    if (folder / META_FILE).exists() and not overwrite:
        raise UserError(f"{folder} already holds a cache for this model and resolution; pass --overwrite to redo it")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    family.to(dev, weight_dtype_of(cfg.mixed_precision), upcast_vae=cfg.upcast_vae)
    store = DTYPES[dtype]

    rows, source = load_rows(data, streaming=False)
    ids = list(range(len(rows)))
    if data.format in ("pickapic", "dcpo") and data.drop_ties:
        labels = rows["label_0"]
        ids = [i for i in ids if labels[i] is None or labels[i] != 0.5]
    if not ids:
        raise DataError(f"{source}: no rows to cache")
    label_0 = rows["label_0"] if "label_0" in rows.column_names else None
    root_dir = Path(data.image_root) if data.image_root else (
        Path(_expand_files(data.data_files)[0]).parent if data.data_files else None)
    decoder = RowDecoder(dataclasses.replace(data, random_flip=False), cfg.resolution, cfg.seed, root_dir)

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    row_writer = _ShardWriter(tmp, "rows")
    prompt_writer = _ShardWriter(tmp, "prompts")
    prompt_ids: dict[str, int] = {}
    prompt_shards: list[list[Any]] = []
    cond_keys: dict[str, list[int]] = {}
    pending_first = 0
    index = {"row_ids": [], "label_0": [], "shard": [], "offset": []}
    bad_rows: dict[str, str] = {}
    latent_shape: list[int] = []
    flips = bool(data.random_flip) and data.format != "prompts"

    def encode_captions(texts: list[str]) -> None:
        nonlocal pending_first
        new = [t for t in dict.fromkeys(texts) if t not in prompt_ids]
        if not new:
            return
        cond = family.encode_prompts(new, resolution=cfg.resolution)
        kept = {k: v.to(store) for k, v in cond.items() if k not in family.row_keys}
        for k, v in kept.items():
            cond_keys.setdefault(k, list(v.shape[1:]))
        for t in new:
            prompt_ids[t] = len(prompt_ids)
        prompt_writer.add(kept)
        if prompt_writer.full():
            prompt_shards.append([f"prompts-{prompt_writer.shard:05d}.safetensors", pending_first, prompt_writer.rows])
            pending_first += prompt_writer.rows
            prompt_writer.flush()

    def posterior(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = family.latent_posterior(pixels.to(dev))
        return mean.to(store), std.to(store)

    encode_captions([""])  # the empty prompt, for prompt dropout
    dataset = _RowsById(rows, ids, decoder)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=default_num_workers(cfg, dev.type),
                                         collate_fn=list)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(ids), desc="cache", unit="row", disable=not progress, dynamic_ncols=True)
    for examples in loader:
        good = [e for e in examples if not isinstance(e, BadRow)]
        first = 0
        if good:
            captions = [e["caption"] for e in good]
            extra = [e[k] for e in good for k in ("caption_w", "caption_l") if k in e]
            encode_captions(captions + extra)
            tensors: dict[str, torch.Tensor] = {
                "caption_id": torch.tensor([prompt_ids[c] for c in captions], dtype=torch.int64),
            }
            for key in ("caption_w", "caption_l"):
                if key in good[0]:
                    tensors[f"{key}_id"] = torch.tensor([prompt_ids[e[key]] for e in good], dtype=torch.int64)
            if "original_size" in good[0]:
                tensors["original_sizes"] = torch.tensor([e["original_size"] for e in good], dtype=torch.int64)
                tensors["crop_top_lefts"] = torch.tensor([e["crop_top_left"] for e in good], dtype=torch.int64)
            if data.format == "images":
                tensors["label"] = torch.tensor([float(e.get("label", float("nan"))) for e in good])
            image_keys = ["_w", "_l"] if data.format in PAIRED_FORMATS else ([""] if data.format == "images" else [])
            for suffix in image_keys:
                pixels = torch.stack([e[f"pixels{suffix}"] for e in good])
                tensors[f"latent_mean{suffix}"], tensors[f"latent_std{suffix}"] = posterior(pixels)
                if flips:
                    tensors[f"latent_mean{suffix}_flip"], tensors[f"latent_std{suffix}_flip"] = posterior(pixels.flip(-1))
                latent_shape = list(tensors[f"latent_mean{suffix}"].shape[1:])
            first = row_writer.add(tensors)
        shard = row_writer.shard
        for e in examples:
            rid = int(e.row_id if isinstance(e, BadRow) else e["row_id"])
            lab = label_0[rid] if label_0 is not None else None
            index["row_ids"].append(rid)
            index["label_0"].append(float("nan") if lab is None else float(lab))
            if isinstance(e, BadRow):
                bad_rows[str(rid)] = e.describe()  # names the file and row
                index["shard"].append(-1)
                index["offset"].append(-1)
            else:
                index["shard"].append(shard)
                index["offset"].append(first)
                first += 1
        if row_writer.full():
            row_writer.flush()
        bar.update(len(examples))
    bar.close()
    row_writer.flush()
    if prompt_writer.rows:
        prompt_shards.append([f"prompts-{prompt_writer.shard:05d}.safetensors", pending_first, prompt_writer.rows])
        prompt_writer.flush()

    from safetensors.torch import save_file

    save_file({
        "row_ids": torch.tensor(index["row_ids"], dtype=torch.int64),
        "label_0": torch.tensor(index["label_0"], dtype=torch.float32),
        "shard": torch.tensor(index["shard"], dtype=torch.int64),
        "offset": torch.tensor(index["offset"], dtype=torch.int64),
    }, str(tmp / INDEX_FILE))
    (tmp / PROMPTS_FILE).write_text(json.dumps(list(prompt_ids)))
    meta = CacheMeta(
        version=CACHE_VERSION, model=cfg.pretrained_model_name_or_path, fingerprint=fp, family=family.name,
        resolution=cfg.resolution, source_format=data.format, source=source, dtype=dtype, flips=flips,
        drop_ties=data.drop_ties, reverse_labels=data.reverse_labels, center_crop=True,
        num_rows=len(index["row_ids"]), num_prompts=len(prompt_ids), latent_shape=latent_shape,
        cond_keys=cond_keys, row_shards=row_writer.files, prompt_shards=prompt_shards, bad_rows=bad_rows,
        encode_precision=cfg.mixed_precision, seconds=round(time.perf_counter() - started, 2),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    (tmp / META_FILE).write_text(json.dumps(dataclasses.asdict(meta), indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


class _RowsById(torch.utils.data.Dataset):
    """Raw rows decoded (epoch 0, no flip) in the given order, for encoding."""

    def __init__(self, rows: Any, ids: list[int], decoder: RowDecoder):
        self.rows, self.ids, self.decoder = rows, ids, decoder

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any] | BadRow:
        return self.decoder(self.rows[self.ids[i]], self.ids[i], 0)


# ----------------------------------------------------------------------------- finding and reading
def find_cache(root: str | Path, fp: str, resolution: int, model: str) -> Path:
    """The cache under `root` made with encoders `fp` at `resolution`, or a DataError saying what is there."""
    root = Path(root)
    if (root / META_FILE).exists():  # pointed straight at one cache
        meta = CacheMeta.read(root)
        _check_identity(meta, root, fp, resolution, model)
        return root
    candidates = sorted(root.glob(f"*/*/{META_FILE}")) if root.is_dir() else []
    found = []
    for path in candidates:
        try:
            meta = CacheMeta.read(path.parent)
        except DataError:
            continue
        if meta.fingerprint == fp and meta.resolution == resolution:
            return path.parent
        found.append(f"{meta.describe()} in {path.parent}")
    there = ("; it holds caches for: " + "; ".join(found)) if found else " (no cache there)"
    raise DataError(
        f"data.cache_dir '{root}' has no cache for model {model} (encoders {fp}) at {resolution} px{there}. "
        "Run `diffusion-po data cache CONFIG` for this model and resolution first."
    )


def _check_identity(meta: CacheMeta, folder: Path, fp: str, resolution: int, model: str) -> None:
    if meta.fingerprint != fp:
        raise DataError(
            f"the cache in {folder} was made for {meta.describe()}; this run uses model {model} whose VAE/text "
            f"encoders differ (encoders {fp}). Encode the data for this model with `diffusion-po data cache`."
        )
    if meta.resolution != resolution:
        raise DataError(
            f"the cache in {folder} was made at resolution {meta.resolution} px; this run trains at {resolution} px. "
            "Set resolution to match, or encode the data at this resolution with `diffusion-po data cache`."
        )


class CacheReader:
    """Random access to a cache's rows and prompts (lazily opened, memory-mapped; safe in loader workers)."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        self.meta = CacheMeta.read(self.folder)
        index = load_file(str(self.folder / INDEX_FILE))
        self.row_ids: list[int] = index["row_ids"].tolist()
        self.label_0: list[float] = index["label_0"].tolist()
        self.shard: list[int] = index["shard"].tolist()
        self.offset: list[int] = index["offset"].tolist()
        self.captions: list[str] = json.loads((self.folder / PROMPTS_FILE).read_text())
        self._prompt_starts = [int(first) for _, first, _ in self.meta.prompt_shards]
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    def _open(self, name: str) -> Any:
        from safetensors import safe_open

        if self._pid != os.getpid():  # a forked loader worker: open its own handles
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def row(self, pos: int, keys: list[str]) -> dict[str, torch.Tensor]:
        """Tensors `keys` of cached row `pos` (which must not be a bad row)."""
        f = self._open(self.meta.row_shards[self.shard[pos]])
        j = self.offset[pos]
        return {k: f.get_slice(k)[j : j + 1][0] for k in keys}

    def prompt_cond(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """The cached conditioning (without per-image keys) of prompt ids, stacked in order."""
        import bisect

        parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.meta.cond_keys}
        for pid in ids:
            s = bisect.bisect_right(self._prompt_starts, pid) - 1
            name, first, _ = self.meta.prompt_shards[s]
            f = self._open(name)
            j = pid - int(first)
            for k in parts:
                parts[k].append(f.get_slice(k)[j : j + 1])
        return {k: torch.cat(v) for k, v in parts.items()}


def flip_draw(seed: int, epoch: int, row_id: Any) -> bool:
    """Whether the image-file path flips row `row_id` in `epoch` (the same draw as `RowDecoder` with a
    centre crop: its per-row generator's first number)."""
    return random.Random(f"{seed}-{epoch}-{row_id}").random() < 0.5


class CacheDataset(torch.utils.data.Dataset):
    """Training examples from a cache, indexed like the image-file path: (epoch, i) over the kept rows."""

    def __init__(self, reader: CacheReader, positions: list[int], data: DataConfig, seed: int):
        self.reader, self.positions, self.seed = reader, positions, seed
        meta = reader.meta
        self.fmt = meta.source_format
        self.flip = bool(data.random_flip) and meta.flips
        self.swap = data.reverse_labels != meta.reverse_labels and self.fmt in PAIRED_FORMATS

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any] | BadRow:
        epoch, i = key
        r = self.reader
        pos = self.positions[i]
        row_id = r.row_ids[pos]
        if r.shard[pos] < 0:
            return BadRow(row_id, r.meta.bad_rows.get(str(row_id), "bad row (see the cache's cache.json)"))
        suffixes = ["_w", "_l"] if self.fmt in PAIRED_FORMATS else ([""] if self.fmt == "images" else [])
        flip = "_flip" if self.flip and suffixes and flip_draw(self.seed, epoch, row_id) else ""
        keys = ["caption_id"] + [f"latent_{s}{x}{flip}" for x in suffixes for s in ("mean", "std")]
        if self.fmt == "dcpo":
            keys += ["caption_w_id", "caption_l_id"]
        if self.fmt != "prompts":
            keys += ["original_sizes", "crop_top_lefts"]
        if self.fmt == "images":
            keys.append("label")
        t = r.row(pos, keys)
        ex: dict[str, Any] = {"row_id": row_id, "caption_id": int(t["caption_id"])}
        for x in suffixes:
            ex[f"latent_mean{x}"] = t[f"latent_mean{x}{flip}"]
            ex[f"latent_std{x}"] = t[f"latent_std{x}{flip}"]
        if self.fmt == "dcpo":
            ex["caption_w_id"], ex["caption_l_id"] = int(t["caption_w_id"]), int(t["caption_l_id"])
        if self.swap:
            for a in ("latent_mean", "latent_std", "caption"):
                ka, kb = (f"{a}_w", f"{a}_l") if a != "caption" else ("caption_w_id", "caption_l_id")
                if ka in ex:
                    ex[ka], ex[kb] = ex[kb], ex[ka]
        if "original_sizes" in t:
            ex["original_size"], ex["crop_top_left"] = t["original_sizes"], t["crop_top_lefts"]
        if "label" in t and not math.isnan(float(t["label"])):
            ex["label"] = float(t["label"])
        return ex


class CacheCollate:
    """Stack cached examples into the batch the methods expect, plus the batch's prompt table
    (`{"index": {caption: row}, "cond": {key: tensor}}`) that `Context.encode_prompts` reads."""

    def __init__(self, reader: CacheReader):
        self.reader = reader

    def __call__(self, examples: list[dict[str, Any] | BadRow]) -> dict[str, Any]:
        good = [e for e in examples if not isinstance(e, BadRow)]
        batch: dict[str, Any] = {"bad_rows": [(e.row_id, e.reason) for e in examples if isinstance(e, BadRow)],
                                 "size": len(good)}
        if not good:
            return batch
        for key in ("latent_mean_w", "latent_std_w", "latent_mean_l", "latent_std_l", "latent_mean", "latent_std"):
            if key in good[0]:
                batch[key] = torch.stack([e[key] for e in good])
        caps = self.reader.captions
        batch["captions"] = [caps[e["caption_id"]] for e in good]
        ids = [0] + [e["caption_id"] for e in good]  # prompt 0 is "" (prompt dropout)
        if "caption_w_id" in good[0]:
            batch["captions_w"] = [caps[e["caption_w_id"]] for e in good]
            batch["captions_l"] = [caps[e["caption_l_id"]] for e in good]
            ids += [e["caption_w_id"] for e in good] + [e["caption_l_id"] for e in good]
        unique = list(dict.fromkeys(ids))
        batch["prompt_table"] = {"index": {caps[p]: j for j, p in enumerate(unique)},
                                 "cond": self.reader.prompt_cond(unique)}
        if "label" in good[0]:
            batch["labels"] = torch.tensor([e.get("label", 1.0) for e in good])
        if "original_size" in good[0]:
            batch["original_sizes"] = torch.stack([e["original_size"] for e in good])
            batch["crop_top_lefts"] = torch.stack([e["crop_top_left"] for e in good])
        batch["row_ids"] = [e["row_id"] for e in good]
        return batch


def _compatible(source_format: str, method_formats: tuple[str, ...]) -> bool:
    if source_format in method_formats:
        return True
    # a dcpo cache is a pickapic cache with per-image captions on top
    return source_format == "dcpo" and any(f in method_formats for f in ("pickapic", "pairs"))


def open_cache(cfg: TrainConfig, family: Any, method_formats: tuple[str, ...] = CACHEABLE_FORMATS,
               fp: str | None = None) -> CacheReader:
    """The reader of the cache for this run's model and resolution, after every compatibility check.
    `fp`: the encoders' fingerprint if already taken (before the trainer cast them to bf16/fp16)."""
    data = cfg.data
    if not data.cache_dir:
        raise DataError("data.format is 'cache' but data.cache_dir is not set: point it at the folder that "
                        "`diffusion-po data cache` wrote")
    fp = fp or fingerprint(family)
    folder = find_cache(data.cache_dir, fp, cfg.resolution, cfg.pretrained_model_name_or_path)
    reader = CacheReader(folder)
    meta = reader.meta
    if not _compatible(meta.source_format, method_formats):
        raise DataError(f"the cache in {folder} holds '{meta.source_format}' rows; method '{cfg.method}' takes "
                        f"{' or '.join(method_formats)}")
    if data.random_flip and not meta.flips and meta.source_format != "prompts":
        raise DataError(f"the cache in {folder} has no mirrored copies (it was made with data.random_flip: false); "
                        "set data.random_flip: false, or re-run `diffusion-po data cache` with it on")
    if data.random_crop or not data.center_crop:
        raise DataError("a cache holds centre crops: set data.random_crop: false and data.center_crop: true")
    if not data.drop_ties and meta.drop_ties and meta.source_format in ("pickapic", "dcpo"):
        raise DataError(f"the cache in {folder} left out ties (data.drop_ties: true when it was made); set "
                        "data.drop_ties: true, or re-run `diffusion-po data cache` with it off")
    return reader


def build_cache_data(
    cfg: TrainConfig, family: Any, method_formats: tuple[str, ...], per_device: int, rank: int, world: int,
    start_micro_step: int = 0, num_workers: int = 0, fp: str | None = None,
) -> TrainData:
    """The loader over a cache for this process, positioned at global micro-step `start_micro_step`;
    the same rows, order and flips as `build_train_data` over the source files."""
    reader = open_cache(cfg, family, method_formats, fp)
    meta, data = reader.meta, cfg.data
    positions = list(range(len(reader.row_ids)))
    dropped = 0
    if data.drop_ties and meta.source_format in ("pickapic", "dcpo"):
        keep = [p for p in positions if not reader.label_0[p] == 0.5]
        dropped = len(positions) - len(keep)
        positions = keep
    if data.max_train_samples is not None:
        positions = positions[: data.max_train_samples]
    if not positions:
        raise DataError(f"the cache in {reader.folder} has no usable rows")
    dataset = CacheDataset(reader, positions, data, cfg.seed)
    sampler = _GlobalBatchSampler(len(positions), per_device, rank, world, cfg.seed, start_micro_step)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=CacheCollate(reader),
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    return TrainData(loader, f"cache {reader.folder} ({meta.source})", len(positions), dropped,
                     sampler.batches_per_epoch)


__all__ = [
    "CACHE_VERSION", "CacheCollate", "CacheDataset", "CacheMeta", "CacheReader", "build_cache_data",
    "cache_folder", "find_cache", "fingerprint", "flip_draw", "model_key", "open_cache", "write_cache",
]
