"""`eval score`: per-image scores of an image run, resumable, with decoding in DataLoader workers.

Each image is decoded once per batch in a worker and turned into one tensor per distinct scorer
transform; every scorer then scores the whole batch at once (text embeddings cached per prompt).
Results are appended after every batch to ``<out>/scores.jsonl`` (one row per image and scorer, with
the scorer's version and checkpoint hash), so an interrupted run never rescores a finished image. At
the end ``<out>/scores.parquet`` (one row per image: manifest fields + all metric columns; scorer
info in the schema metadata) and ``<out>/scores_meta.json`` are written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from diffusion_po.errors import DataError
from diffusion_po.eval.manifest import RUN_INFO, append_jsonl, read_jsonl, read_manifest
from diffusion_po.eval.scorers import Scorer
from diffusion_po.eval.scorers.base import flatten_on_white
from diffusion_po.tiny import has_random_weights

SCORES_JSONL = "scores.jsonl"
SCORES_PARQUET = "scores.parquet"
SCORES_META = "scores_meta.json"
MANIFEST_FIELDS = ("image", "prompt", "prompt_index", "prompt_id", "category", "k", "seed")


class ImageBatchDataset(Dataset):
    """Decodes an image file and applies each distinct scorer transform (runs in the workers)."""

    def __init__(self, rows: Sequence[dict[str, Any]], transforms: dict[str, Any]) -> None:
        self.rows = list(rows)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.rows[i]["_path"]
        try:
            with Image.open(path) as im:
                image = flatten_on_white(im)  # transparent pixels on white, for every scorer
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            return {"i": i, "error": f"{path}: cannot read image ({type(exc).__name__}: {exc})"}
        return {"i": i, "pixels": {key: t(image) for key, t in self.transforms.items()}}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [it for it in items if "error" not in it]
    return {
        "i": [it["i"] for it in good],
        "errors": [it["error"] for it in items if "error" in it],
        "pixels": {k: torch.stack([it["pixels"][k] for it in good]) for k in (good[0]["pixels"] if good else {})},
    }


def _done_keys(rows: list[dict[str, Any]], scorers: Sequence[Scorer]) -> dict[str, set[str]]:
    """Images already scored by each scorer (same checkpoint hash and version)."""
    wanted = {s.name: (s.checkpoint_hash, s.version) for s in scorers}
    done: dict[str, set[str]] = {s.name: set() for s in scorers}
    for r in rows:
        name = r.get("scorer")
        if name in wanted and (r.get("checkpoint_hash"), r.get("version")) == wanted[name]:
            done[name].add(r["image"])
    return done


def default_num_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def score_run(
    run: str | Path,
    scorers: Sequence[Scorer],
    out: str | Path | None = None,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
    skip_bad_images: bool = False,
) -> dict[str, Any]:
    """Score every image of the run ``run`` (folder with manifest.jsonl) with ``scorers``.

    Returns the meta dict written to ``scores_meta.json`` (scorer info and throughput)."""
    from tqdm.auto import tqdm

    if not scorers:
        raise DataError("no scorers given")
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise DataError(f"duplicate scorers: {names}")
    rows = read_manifest(run)
    out = Path(out) if out is not None else Path(run if Path(run).is_dir() else Path(run).parent)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / SCORES_JSONL
    previous = read_jsonl(jsonl)
    done = _done_keys(previous, scorers)
    todo = [r for r in rows if any(r["image"] not in done[s.name] for s in scorers)]

    transforms: dict[str, Any] = {}
    for s in scorers:
        transforms.setdefault(s.transform_id or s.name, s.image_transform())
    workers = default_num_workers() if num_workers is None else num_workers
    timing = {s.name: 0.0 for s in scorers}
    counted = {s.name: 0 for s in scorers}
    errors: list[str] = []
    data_wait = 0.0  # time the loop waited for decoded batches (decode/preprocess-bound when large)
    t_start = time.perf_counter()
    if todo:
        loader = DataLoader(
            ImageBatchDataset(todo, transforms),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=any(s.device.type == "cuda" for s in scorers),
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )
        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="score", unit="img", disable=not progress)
        try:
            t_wait = time.perf_counter()
            for batch in loader:
                data_wait += time.perf_counter() - t_wait
                if batch["errors"]:
                    if not skip_bad_images:
                        raise DataError(
                            f"{batch['errors'][0]} (pass --skip-bad-images to record and skip unreadable images)"
                        )
                    errors.extend(batch["errors"])
                new_rows: list[dict[str, Any]] = []
                batch_rows = [todo[i] for i in batch["i"]]
                for s in scorers:
                    sel = [j for j, r in enumerate(batch_rows) if r["image"] not in done[s.name]]
                    if not sel:
                        continue
                    pixels = batch["pixels"][s.transform_id or s.name]
                    if len(sel) != len(batch_rows):
                        pixels = pixels[sel]
                    t0 = time.perf_counter()
                    values = s.score_pixels(pixels, [batch_rows[j]["prompt"] for j in sel])
                    if s.device.type == "cuda":
                        torch.cuda.synchronize(s.device)
                    timing[s.name] += time.perf_counter() - t0
                    counted[s.name] += len(sel)
                    values = {k: v.detach().float().cpu().tolist() for k, v in values.items()}
                    for n, j in enumerate(sel):
                        row = {"image": batch_rows[j]["image"], "scorer": s.name}
                        row.update({k: v[n] for k, v in values.items()})
                        row["version"] = s.version
                        row["checkpoint_hash"] = s.checkpoint_hash
                        new_rows.append(row)
                        done[s.name].add(batch_rows[j]["image"])
                append_jsonl(jsonl, new_rows)
                bar.update(len(batch["i"]) + len(batch["errors"]))
                t_wait = time.perf_counter()
        finally:
            bar.close()
    wall = time.perf_counter() - t_start
    meta = {
        "run": str(Path(run)),
        "n_images": len(rows),
        "scorers": {s.name: s.info() for s in scorers},
        "throughput": {
            "images_scored": len(todo),
            "wall_seconds": round(wall, 3),
            "images_per_second": round(len(todo) / wall, 2) if todo and wall > 0 else None,
            "batch_size": batch_size,
            "num_workers": workers,
            # where the wall time went: waiting for images, in the scorers, the rest (collate, writes)
            "data_wait_seconds": round(data_wait, 3),
            "model_seconds": round(sum(timing.values()), 3),
            "other_seconds": round(max(0.0, wall - data_wait - sum(timing.values())), 3),
            "per_scorer_images_per_second": {
                k: (round(counted[k] / timing[k], 2) if timing[k] > 0 else None) for k in timing
            },
        },
        "unreadable_images": errors,
    }
    write_score_table(rows, read_jsonl(jsonl), scorers, out, meta)
    return meta


def random_weights_meta(run: str | Path, scorers: dict[str, Any]) -> dict[str, Any]:
    """Which weights behind a run's scores are random test weights (the tiny models of the tests): the
    generating model's (from the run's ``run.json``) and the scorers'. ``note`` says so when any are."""
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    models: list[str] = []
    if (folder / RUN_INFO).is_file():
        try:
            config = json.loads((folder / RUN_INFO).read_text()).get("config", {})
        except ValueError:
            config = {}
        models = [str(config[k]) for k in ("model", "network", "lora", "npo_lora")
                  if config.get(k) and has_random_weights(config[k])]
    names = sorted(n for n, info in scorers.items() if info.get("random_weights"))
    out: dict[str, Any] = {"any": bool(models or names), "models": models, "scorers": names}
    if out["any"]:
        out["note"] = "scores from random test weights: they test the pipeline and measure nothing"
    return out


def merge_scores(
    rows: list[dict[str, Any]], score_rows: list[dict[str, Any]], scorers: Sequence[Scorer] | dict[str, Any]
) -> list[dict[str, Any]]:
    """One dict per image: manifest fields + the metric values of the current scorers."""
    if isinstance(scorers, dict):
        wanted = {n: (i["checkpoint_hash"], i["version"], i["metrics"]) for n, i in scorers.items()}
    else:
        wanted = {s.name: (s.checkpoint_hash, s.version, list(s.metrics)) for s in scorers}
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in score_rows:
        w = wanted.get(r.get("scorer"))
        if w and (r.get("checkpoint_hash"), r.get("version")) == w[:2]:
            latest[(r["image"], r["scorer"])] = r
    table = []
    for row in rows:
        rec = {k: row.get(k) for k in MANIFEST_FIELDS}
        for name, (_, _, metrics) in wanted.items():
            sr = latest.get((row["image"], name))
            for m in metrics:
                rec[m] = None if sr is None else sr.get(m)
        table.append(rec)
    return table


def write_score_table(
    rows: list[dict[str, Any]],
    score_rows: list[dict[str, Any]],
    scorers: Sequence[Scorer],
    out: Path,
    meta: dict[str, Any],
) -> Path:
    """Write ``scores.parquet`` (wide) and ``scores_meta.json``; merges with scorers of earlier calls."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta_path = out / SCORES_META
    all_scorers: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            all_scorers = json.loads(meta_path.read_text()).get("scorers", {})
        except ValueError:
            all_scorers = {}
    all_scorers.update(meta["scorers"])
    meta = dict(meta, scorers=all_scorers, random_weights=random_weights_meta(meta["run"], all_scorers))
    table = merge_scores(rows, score_rows, all_scorers)
    columns: dict[str, list[Any]] = {k: [r.get(k) for r in table] for k in table[0]}
    for k in ("prompt_index", "k", "seed"):
        columns[k] = [None if v is None else int(v) for v in columns[k]]
    for k in ("prompt_id", "category"):
        columns[k] = [None if v is None else str(v) for v in columns[k]]
    arrow = pa.table(columns)
    arrow = arrow.replace_schema_metadata({"diffusion_po.scores": json.dumps(meta)})
    target = out / SCORES_PARQUET
    tmp = target.with_suffix(".parquet.tmp")
    pq.write_table(arrow, tmp)
    os.replace(tmp, target)
    meta_path.write_text(json.dumps(meta, indent=1))
    return target


def load_score_table(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and meta of a scored run: a run folder (scores.parquet), a parquet file, or a JSONL file
    of per-image rows (``image``, ``prompt``, metric columns)."""
    path = Path(path)
    if path.is_dir():
        if (path / SCORES_PARQUET).is_file():
            path = path / SCORES_PARQUET
        else:
            raise DataError(f"{path} has no {SCORES_PARQUET}; run `diffusion-po eval score --images {path}` first")
    if not path.is_file():
        raise DataError(f"{path}: no such score file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(b"diffusion_po.scores")
        meta = json.loads(raw) if raw else {}
        return table.to_pylist(), meta
    rows = read_jsonl(path, tolerate_partial_last_line=False)
    meta_path = path.parent / SCORES_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return rows, meta
