"""Training data: Pick-a-Pic v2 parquet, plain local pairs, DCPO dual captions, unpaired images, prompts.

Everything goes through Hugging Face `datasets` from local files (or a `save_to_disk` folder / hub id).
Rows are decoded lazily; a bad row (undecodable image, missing caption, label out of range) is skipped,
counted and reported, or stops the run with its row id in strict mode.

Order is deterministic: one permutation per epoch from the seed, cut into global micro-batches of
`train_batch_size x processes`; each process keeps its slice. So a resumed run continues the same data
order, and a 2-process run sees the same global batches as a 1-process run.
"""

from __future__ import annotations

import bisect
import functools
import glob
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusion_po.config import DataConfig
from diffusion_po.errors import DataError

REQUIRED_COLUMNS: dict[str, list[list[str]]] = {
    # each inner list: alternatives for one required column
    "pickapic": [["jpg_0"], ["jpg_1"], ["label_0"], ["caption"]],
    "dcpo": [["jpg_0"], ["jpg_1"], ["label_0"], ["caption_0"], ["caption_1"]],
    "pairs": [["prompt", "caption"], ["chosen"], ["rejected"]],
    "images": [["image", "jpg"], ["caption", "prompt"]],
    "prompts": [["caption", "prompt", "text"]],
}
PAIRED_FORMATS = ("pickapic", "dcpo", "pairs")


@dataclass
class BadRow:
    row_id: Any
    reason: str
    where: str = ""
    """The file and the row inside it (`train-0001.parquet row 17`), where known."""

    def describe(self) -> str:
        """`<file> row <n>: <reason>` (or `row <id>: <reason>` where the file is not known)."""
        return f"{self.where or f'row {self.row_id}'}: {self.reason}"


def _expand_files(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matches:
            raise DataError(f"data file not found: {pattern} (data.data_files); check the path or glob")
        for match in matches:
            files.extend(_folder_files(Path(match)) if Path(match).is_dir() else [match])
    return files


#: what a folder in data.data_files contributes: its files of the first kind it has, searched recursively
FOLDER_KINDS = ((".parquet",), (".jsonl", ".json"), (".csv",))


def _folder_files(folder: Path) -> list[str]:
    """The data files under `folder` (parquet, else jsonl/json, else csv), skipping hidden files and folders."""
    found = [p for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    for suffixes in FOLDER_KINDS:
        chosen = [str(p) for p in found if p.suffix.lower() in suffixes]
        if chosen:
            return chosen
    raise DataError(f"data folder {folder} has no .parquet, .jsonl/.json or .csv files (data.data_files)")


def _check_no_images_layout(columns: list[str] | None, fmt: str, source: str) -> None:
    """Pick-a-Pic rows with image URLs instead of bytes (pickapic_v2_no_images) need the download step first."""
    if fmt in ("pickapic", "dcpo") and columns and "image_0_url" in columns and "jpg_0" not in columns:
        raise DataError(
            f"{source}: these rows have image URLs (image_0_url/image_1_url) but no jpg_0/jpg_1: the "
            "pickapic_v2_no_images layout. Download the images once with `diffusion-po data download "
            "FILES --out DIR` and train on data.data_files: [DIR]"
        )
@functools.lru_cache(maxsize=4096)
def _file_rows(path: str, size: int, mtime_ns: int) -> int | None:
    """Rows in one data file, checked so that a damaged file stops with its name instead of a traceback
    from deep in `datasets`: parquet (readable footer, at least one row), jsonl (every line a JSON object).
    None where the count is not known cheaply (csv, txt, a .json array). Cached per file version."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            what = "is empty (0 bytes)" if size == 0 else f"is not a readable parquet file ({str(exc).splitlines()[0]})"
            raise DataError(f"{path} {what}; re-download it or remove it from data.data_files") from None
        if rows == 0:
            raise DataError(f"{path} has 0 rows; remove it from data.data_files")
        return rows
    if suffix not in (".jsonl", ".json"):
        return None
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    if suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # not one JSON document: read as JSON lines, as `datasets` does
        if whole is not None:
            return len(whole) if isinstance(whole, list) else None
    rows = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # `datasets` skips blank lines
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg}); fix or remove the line") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object (one row), got {type(value).__name__}")
        rows += 1
    if rows == 0:
        raise DataError(f"{path} has 0 rows; remove it from data.data_files")
    return rows


def checked_row_counts(files: list[str]) -> list[int | None]:
    """Each file's row count (see `_file_rows`); raises DataError naming a damaged or empty file."""
    counts = []
    for f in files:
        stat = Path(f).stat()
        counts.append(_file_rows(str(f), stat.st_size, stat.st_mtime_ns))
    return counts


class RowLocator:
    """Global row index (as `load_rows` concatenates the files) -> `<file> row <n>`."""

    def __init__(self, files: list[str], counts: list[int | None]):
        self.files = files
        self.starts: list[int] | None = None
        if files and all(c is not None for c in counts):
            self.starts = [0]
            for c in counts:
                self.starts.append(self.starts[-1] + c)

    def __call__(self, row_id: Any) -> str:
        if self.starts is None or not isinstance(row_id, int) or not 0 <= row_id < self.starts[-1]:
            return ""
        k = bisect.bisect_right(self.starts, row_id) - 1
        return f"{self.files[k]} row {row_id - self.starts[k]}"


def _builder_for(files: list[str]) -> str:
    exts = {Path(f).suffix.lower() for f in files}
    if exts <= {".parquet"}:
        return "parquet"
    if exts <= {".jsonl", ".json"}:
        return "json"
    if exts <= {".csv"}:
        return "csv"
    if exts <= {".txt"}:
        return "text"
    raise DataError(f"data files must all be .parquet, .jsonl/.json, .csv or .txt; got {sorted(exts)}")


def load_rows(cfg: DataConfig, streaming: bool | None = None):
    """The raw rows as a `datasets.Dataset` (or `IterableDataset` when streaming)."""
    import datasets

    streaming = cfg.streaming if streaming is None else streaming
    if cfg.data_files:
        files = _expand_files(cfg.data_files)
        builder = _builder_for(files)
        checked_row_counts(files)
        ds = datasets.load_dataset(builder, data_files={cfg.split: files}, split=cfg.split, streaming=streaming)
        if builder == "text":
            ds = ds.rename_column("text", "caption")
        source = ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")
    elif cfg.dataset_name:
        path = Path(cfg.dataset_name).expanduser()
        source = cfg.dataset_name
        try:
            if (path / "dataset_info.json").exists() or (path / "state.json").exists():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[cfg.split]
                if streaming:
                    ds = ds.to_iterable_dataset()
            else:
                ds = datasets.load_dataset(cfg.dataset_name, split=cfg.split, streaming=streaming)
        except (FileNotFoundError, ConnectionError, ValueError, OSError) as exc:
            raise DataError(
                f"could not load data set '{cfg.dataset_name}' (split '{cfg.split}'): {exc}. "
                "Pass local files with data.data_files (parquet/jsonl/csv)."
            ) from exc
    else:
        raise DataError("no data given: set data.data_files (local parquet/jsonl/csv files) or data.dataset_name")
    _check_no_images_layout(ds.column_names, cfg.format, source)
    _check_columns(ds.column_names, cfg.format, source)
    return ds, source


def _check_columns(columns: list[str] | None, fmt: str, source: str) -> None:
    if columns is None:  # some streaming sources only know their columns after the first row
        return
    missing = [" or ".join(alts) for alts in REQUIRED_COLUMNS.get(fmt, []) if not any(a in columns for a in alts)]
    if missing:
        raise DataError(
            f"{source}: data format '{fmt}' needs column(s) {', '.join(missing)}; found {', '.join(columns)}. "
            "Set data.format to match the files, or rename the columns."
        )


def _first(row: dict[str, Any], names: list[str]) -> Any:
    for n in names:
        if n in row:
            return row[n]
    return None


def decode_image(value: Any, root: Path | None = None) -> Image.Image:
    """Bytes, a datasets Image dict, a path (relative to `root`) or a PIL image -> RGB PIL image."""
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, dict):
        if value.get("bytes"):
            img = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            return decode_image(value["path"], root)
        else:
            raise ValueError("image dict has neither bytes nor path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and root is not None:
            path = root / path
        img = Image.open(path)
    else:
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    img.load()
    return img.convert("RGB")


class PairTransform:
    """Resize (shorter side) and crop (center or random) each image on its own, as the reference scripts do,
    then flip; a pair of one size shares one crop draw, and both images share the flip."""

    def __init__(self, resolution: int, center_crop: bool = True, random_crop: bool = False, random_flip: bool = True):
        self.resolution = resolution
        self.random_crop = random_crop or not center_crop
        self.random_flip = random_flip

    def __call__(self, images: list[Image.Image], rng: random.Random, size_from: int = 0,
                 target: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """Returns (stacked pixels in [-1, 1], original (h, w) and crop (top, left) of `images[size_from]`
        (SDXL's micro-conditioning: jpg_0's, as the references). `target`: (width, height) of an aspect
        bucket (each image is scaled to cover it, then cropped); None: resolution x resolution."""
        tw, th = target or (self.resolution, self.resolution)
        crops: dict[tuple[int, int], tuple[int, int]] = {}  # resized (w, h) -> crop (top, left)
        out, reported = [], (0, 0)
        for k, im in enumerate(images):
            scale = max(tw / im.width, th / im.height)  # square: resolution / the shorter side
            new_w, new_h = max(tw, round(im.width * scale)), max(th, round(im.height * scale))
            if (new_w, new_h) not in crops:
                if self.random_crop:
                    crops[new_w, new_h] = rng.randint(0, new_h - th), rng.randint(0, new_w - tw)
                else:
                    crops[new_w, new_h] = (new_h - th) // 2, (new_w - tw) // 2
            top, left = crops[new_w, new_h]
            if k == size_from:
                reported = (top, left)
            out.append(im.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + tw, top + th)))
        if self.random_flip and rng.random() < 0.5:
            out = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in out]
        arrays = [torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1) for im in out]
        pixels = torch.stack(arrays).float() / 127.5 - 1.0
        original = (images[size_from].height, images[size_from].width)
        return pixels, original, reported


class RowDecoder:
    """Turns one raw row into a training example dict, or a `BadRow`."""

    def __init__(self, cfg: DataConfig, resolution: int, seed: int, root: Path | None):
        self.cfg = cfg
        self.fmt = cfg.format
        self.seed = seed
        self.root = root
        self.transform = PairTransform(resolution, cfg.center_crop, cfg.random_crop, cfg.random_flip)
        files = _expand_files(cfg.data_files) if cfg.data_files else []
        self.locate = RowLocator(files, checked_row_counts(files))

    def __call__(self, row: dict[str, Any], row_id: Any, epoch: int,
                 target: tuple[int, int] | None = None) -> dict[str, Any] | BadRow:
        """`target`: the (width, height) of the row's aspect bucket (the example then carries `target_size`)."""
        try:
            example = self._decode(row, row_id, epoch, target)
            if target is not None and isinstance(example, dict):
                example["target_size"] = (target[1], target[0])
            return example
        except Exception as exc:  # a bad row must not kill a long run: it is reported instead
            return BadRow(row_id, f"{type(exc).__name__}: {exc}", self.locate(row_id))

    def _caption(self, row: dict[str, Any], names: list[str]) -> str:
        text = _first(row, names)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"missing caption (column {' or '.join(names)})")
        return text

    def _decode(self, row: dict[str, Any], row_id: Any, epoch: int,
                target: tuple[int, int] | None = None) -> dict[str, Any] | BadRow:
        rng = random.Random(f"{self.seed}-{epoch}-{row_id}")
        fmt = self.fmt
        if fmt == "prompts":
            return {"caption": self._caption(row, ["caption", "prompt", "text"]), "row_id": row_id}
        if fmt == "images":
            pixels, orig, crop = self.transform([decode_image(_first(row, ["image", "jpg"]), self.root)], rng,
                                                target=target)
            example = {"pixels": pixels[0], "caption": self._caption(row, ["caption", "prompt"]), "row_id": row_id,
                       "original_size": orig, "crop_top_left": crop}
            if self.cfg.label_column in row and row[self.cfg.label_column] is not None:
                label = float(row[self.cfg.label_column])
                if label not in (0.0, 1.0):
                    raise ValueError(f"label {label} must be 0 or 1")
                example["label"] = label
            return example
        if fmt in ("pickapic", "dcpo"):
            label = row.get("label_0")
            if label is None or not (0.0 <= float(label) <= 1.0) or math.isnan(float(label)):
                raise ValueError(f"label_0 {label!r} out of range [0, 1]")
            label = float(label)
            images = [row["jpg_0"], row["jpg_1"]]
            captions = [row.get("caption_0"), row.get("caption_1")]
            first = 0  # where jpg_0 (whose size SDXL's time ids take) ends up
            if label < 0.5:  # winner first; a kept tie (drop_ties: false) keeps jpg_0 first
                images, captions, first = images[::-1], captions[::-1], 1
            caption = self._caption(row, ["caption"]) if fmt == "pickapic" else row.get("caption")
        else:  # pairs
            images = [row["chosen"], row["rejected"]]
            captions = [None, None]
            first = 0
            caption = self._caption(row, ["prompt", "caption"])
        if self.cfg.reverse_labels:
            images, captions, first = images[::-1], captions[::-1], 1 - first
        decoded = [decode_image(im, self.root) for im in images]
        pixels, orig, crop = self.transform(decoded, rng, size_from=first, target=target)
        example = {"pixels_w": pixels[0], "pixels_l": pixels[1], "caption": caption, "row_id": row_id,
                   "original_size": orig, "crop_top_left": crop}
        if fmt == "dcpo":
            for key, text in zip(("caption_w", "caption_l"), captions):
                if not isinstance(text, str) or not text.strip():
                    raise ValueError("missing per-image caption (caption_0/caption_1)")
                example[key] = text
            example["caption"] = caption if isinstance(caption, str) and caption else example["caption_w"]
        return example


def collate(examples: list[dict[str, Any] | BadRow]) -> dict[str, Any]:
    """Stack good examples; bad ones are listed under `bad_rows` as (row_id, reason)."""
    good = [e for e in examples if not isinstance(e, BadRow)]
    batch: dict[str, Any] = {"bad_rows": [(e.row_id, e.describe()) for e in examples if isinstance(e, BadRow)]}
    batch["size"] = len(good)
    if not good:
        return batch
    for key in ("pixels_w", "pixels_l", "pixels"):
        if key in good[0]:
            batch[key] = torch.stack([e[key] for e in good])
    batch["captions"] = [e["caption"] for e in good]
    for key in ("caption_w", "caption_l"):
        if key in good[0]:
            batch[key.replace("caption", "captions")] = [e[key] for e in good]
    if "label" in good[0]:
        batch["labels"] = torch.tensor([e.get("label", 1.0) for e in good])
    if "target_size" in good[0]:  # aspect buckets: one bucket per batch
        batch["target_size"] = good[0]["target_size"]
    if "original_size" in good[0]:
        batch["original_sizes"] = torch.tensor([e["original_size"] for e in good])
        batch["crop_top_lefts"] = torch.tensor([e["crop_top_left"] for e in good])
    batch["row_ids"] = [e["row_id"] for e in good]
    return batch


class _MapRows(torch.utils.data.Dataset):
    """Rows by (epoch, position); `targets`: each position's aspect-bucket (width, height), or None."""

    def __init__(self, rows, ids: list[int], decoder: RowDecoder, targets: list[tuple[int, int]] | None = None):
        self.rows, self.ids, self.decoder, self.targets = rows, ids, decoder, targets
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        if self.targets is not None:
            return self.decoder(self.rows[self.ids[i]], self.ids[i], epoch, self.targets[i])
        return self.decoder(self.rows[self.ids[i]], self.ids[i], epoch)


class _GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this process's slice of each global micro-batch, from micro-step `start` on, forever."""

    def __init__(self, n: int, per_device: int, rank: int, world: int, seed: int, start: int = 0):
        self.n, self.per_device, self.rank, self.world, self.seed, self.start = n, per_device, rank, world, seed, start
        self.global_batch = per_device * world
        self.batches_per_epoch = n // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the data set has {n} usable rows, fewer than one global batch "
                f"({per_device} per device x {world} processes); lower train_batch_size or add data"
            )

    def __iter__(self):
        step = self.start
        while True:
            epoch, b = divmod(step, self.batches_per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000003 + epoch))
            lo = b * self.global_batch + self.rank * self.per_device
            yield [(epoch, int(i)) for i in perm[lo : lo + self.per_device]]
            step += 1


#: SDXL's standard training buckets at 1024 pixels, (width, height) (the SDXL report's multi-aspect training)
SDXL_BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (1536, 640), (640, 1536))
#: the image column whose aspect ratio picks a row's bucket (jpg_0: the image SDXL's time ids describe)
BUCKET_COLUMNS = {"pickapic": ["jpg_0"], "dcpo": ["jpg_0"], "pairs": ["chosen"], "images": ["image", "jpg"]}


def standard_buckets(resolution: int) -> list[tuple[int, int]]:
    """SDXL_BUCKETS scaled to `resolution`, each side a multiple of max(8, resolution / 16)."""
    step = max(8, resolution // 16)
    out: list[tuple[int, int]] = []
    for w, h in SDXL_BUCKETS:
        size = (max(step, round(w * resolution / 1024 / step) * step), max(step, round(h * resolution / 1024 / step) * step))
        if size not in out:
            out.append(size)
    return out


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio is nearest (in log ratio) to width / height."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda k: abs(math.log(buckets[k][0] / buckets[k][1]) - ratio))


def _image_size(value: Any, root: Path | None) -> tuple[int, int]:
    """(width, height) of an image value (bytes, datasets dict, path, PIL) from its header only."""
    if isinstance(value, Image.Image):
        return value.size
    if isinstance(value, dict):
        return _image_size(value.get("bytes") or value.get("path"), root)
    if isinstance(value, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(value))) as im:
            return im.size
    path = Path(value)
    with Image.open(path if path.is_absolute() or root is None else root / path) as im:
        return im.size


def row_buckets(rows, ids: list[int], fmt: str, buckets: list[tuple[int, int]], root: Path | None) -> list[int]:
    """Each kept row's bucket index, from its first image's size (read once, headers only). A row whose image
    does not open goes to bucket 0; decoding reports it as a bad row."""
    names = [c for c in BUCKET_COLUMNS[fmt] if c in rows.column_names]
    column = rows.select_columns(names[:1])
    out = []
    for i in ids:
        try:
            out.append(nearest_bucket(*_image_size(column[i][names[0]], root), buckets))
        except Exception:
            out.append(0)
    return out


class _BucketBatchSampler(torch.utils.data.Sampler):
    """Aspect buckets: this process's slice of each global micro-batch, every batch from one bucket, from
    micro-step `start` on, forever. An epoch shuffles each bucket's rows, cuts them into global batches
    (a bucket's remainder waits for the next epoch) and shuffles the batches, all from the seed; the
    position is the micro-step alone, so a resume continues exactly."""

    def __init__(self, bucket_of: list[int], per_device: int, rank: int, world: int, seed: int, start: int = 0):
        self.per_device, self.rank, self.world, self.seed, self.start = per_device, rank, world, seed, start
        self.global_batch = per_device * world
        self.members: dict[int, list[int]] = {}
        for position, bucket in enumerate(bucket_of):
            self.members.setdefault(bucket, []).append(position)
        self.batches_per_epoch = sum(len(m) // self.global_batch for m in self.members.values())
        if self.batches_per_epoch == 0:
            raise DataError(f"no aspect bucket holds one global batch ({per_device} per device x {world} processes; "
                            f"rows per bucket: {sorted(len(m) for m in self.members.values())}); lower "
                            "train_batch_size, use fewer buckets (data.buckets) or add data")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches (positions) of one epoch, in order."""
        gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        batches = []
        for bucket in sorted(self.members):
            members = self.members[bucket]
            perm = torch.randperm(len(members), generator=gen).tolist()
            for lo in range(0, len(members) - self.global_batch + 1, self.global_batch):
                batches.append([members[j] for j in perm[lo : lo + self.global_batch]])
        order = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[k] for k in order]

    def __iter__(self):
        step, cached = self.start, (None, [])
        while True:
            epoch, b = divmod(step, self.batches_per_epoch)
            if cached[0] != epoch:
                cached = (epoch, self.epoch_batches(epoch))
            lo = self.rank * self.per_device
            yield [(epoch, i) for i in cached[1][b][lo : lo + self.per_device]]
            step += 1


class _StreamRows(torch.utils.data.IterableDataset):
    """Streaming: shard by process, shuffle with a buffer, skip what a resumed run already consumed."""

    def __init__(self, rows, decoder: RowDecoder, per_device: int, rank: int, world: int, seed: int,
                 buffer: int, start: int):
        self.rows, self.decoder, self.per_device = rows, decoder, per_device
        self.rank, self.world, self.seed, self.buffer, self.start = rank, world, seed, buffer, start

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node

        shard = split_dataset_by_node(self.rows, rank=self.rank, world_size=self.world)
        epoch, to_skip = 0, self.start * self.per_device
        while True:
            ds = shard.shuffle(seed=self.seed + epoch, buffer_size=self.buffer)
            produced = 0
            batch = []
            for i, row in enumerate(ds):
                produced += 1
                if to_skip:
                    to_skip -= 1
                    continue
                batch.append(self.decoder(row, f"{self.rank}:{epoch}:{i}", epoch))
                if len(batch) == self.per_device:
                    yield batch
                    batch = []
            if produced == 0:
                raise DataError("the streaming data set yielded no rows")
            epoch += 1


@dataclass
class TrainData:
    """A data loader positioned at a micro-step, plus what is known about the source."""

    loader: torch.utils.data.DataLoader
    source: str
    num_rows: int | None
    dropped_ties: int = 0
    batches_per_epoch: int | None = None
    """Global micro-batches in one pass over the data (None when streaming)."""


def build_train_data(
    cfg: DataConfig, resolution: int, per_device: int, rank: int, world: int, seed: int,
    start_micro_step: int = 0, num_workers: int = 0,
) -> TrainData:
    """The loader for this process, starting at global micro-step `start_micro_step`."""
    rows, source = load_rows(cfg)
    root = Path(cfg.image_root) if cfg.image_root else (Path(_expand_files(cfg.data_files)[0]).parent if cfg.data_files else None)
    decoder = RowDecoder(cfg, resolution, seed, root)
    if cfg.streaming:
        ds = _StreamRows(rows, decoder, per_device, rank, world, seed, cfg.shuffle_buffer_size, start_micro_step)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=min(num_workers, 1),
                                             collate_fn=collate)
        return TrainData(loader, source, None)
    ids = list(range(len(rows)))
    dropped = 0
    if cfg.format in ("pickapic", "dcpo") and cfg.drop_ties:
        labels = rows["label_0"]
        keep = [i for i in ids if labels[i] is None or labels[i] != 0.5]
        dropped = len(ids) - len(keep)
        ids = keep
    if cfg.max_train_samples is not None:
        ids = ids[: cfg.max_train_samples]
    if not ids:
        raise DataError(
            f"{source}: no usable rows ({dropped} ties dropped); check data.format and data.drop_ties"
        )
    if cfg.aspect_buckets:
        buckets = [tuple(b) for b in cfg.buckets] or standard_buckets(resolution)
        bucket_of = row_buckets(rows, ids, cfg.format, buckets, root)
        dataset = _MapRows(rows, ids, decoder, [buckets[k] for k in bucket_of])
        sampler = _BucketBatchSampler(bucket_of, per_device, rank, world, seed, start_micro_step)
    else:
        dataset = _MapRows(rows, ids, decoder)
        sampler = _GlobalBatchSampler(len(ids), per_device, rank, world, seed, start_micro_step)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    return TrainData(loader, source, len(ids), dropped, sampler.batches_per_epoch)
