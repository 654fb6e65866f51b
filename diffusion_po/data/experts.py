"""Diffusion-DRO expert selection: the top-N images of a data set by a scorer (the reference keeps the 500
best Pick-a-Pic v2 train images by PickScore or HPSv2; pair labels are not used).

Every (image, caption) of the input is scored with `score(images, prompts) -> list[float]` (any callable,
e.g. a scorer of `diffusion_po.eval.scorers` by name); from Pick-a-Pic rows both images count, each with the
pair's caption, once per distinct (image, caption) (by `image_k_uid` when present, else by content hash).
The N best are written as PNG files plus `experts.jsonl` (image, caption, score, source), which is the
`images` data format: train DRO with `data.format: images`, `data.data_files: [OUT/experts.jsonl]`.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import importlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from diffusion_po.errors import DataError, UserError

ScoreFn = Callable[[list[Any], list[str]], Sequence[float]]


def _candidates(files: list[str], batch_size: int) -> Iterator[list[tuple[str, Any, str, str]]]:
    """Batches of (source id, raw image value, caption, dedup key) from Pick-a-Pic or images parquet/jsonl."""
    import pyarrow.parquet as pq

    for path in files:
        if path.endswith(".parquet"):
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            batches = (b.to_pydict() for b in pf.iter_batches(batch_size=batch_size))
        else:
            names, batches = _jsonl_batches(path, batch_size)
        pick = "jpg_0" in names and "jpg_1" in names
        img_cols = ["jpg_0", "jpg_1"] if pick else [c for c in ("image", "jpg") if c in names][:1]
        cap_col = next((c for c in ("caption", "prompt") if c in names), None)
        if not img_cols or cap_col is None:
            raise DataError(f"{path}: needs jpg_0/jpg_1 + caption (Pick-a-Pic) or image + caption columns; "
                            f"found {', '.join(names)}")
        row = 0
        for cols in batches:
            out = []
            n = len(cols[cap_col])
            for i in range(n):
                caption = cols[cap_col][i]
                if not isinstance(caption, str) or not caption.strip():
                    continue
                for k, col in enumerate(img_cols):
                    value = cols[col][i]
                    if value is None:
                        continue
                    uid_col = f"image_{k}_uid" if pick else None
                    uid = cols[uid_col][i] if uid_col and uid_col in cols else None
                    key = f"{uid}|{caption}" if uid else f"{_hash(value)}|{caption}"
                    out.append((f"{Path(path).name}:{row + i}:{col}", value, caption, key))
            row += n
            yield out


def _jsonl_batches(path: str, batch_size: int):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    names = sorted({k for r in rows for k in r})
    root = Path(path).parent

    def gen():
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo:lo + batch_size]
            cols = {k: [r.get(k) for r in chunk] for k in names}
            for col in ("image", "jpg"):
                if col in cols:
                    cols[col] = [str(root / v) if isinstance(v, str) and not Path(v).is_absolute() else v
                                 for v in cols[col]]
            yield cols

    return names, gen()


def _hash(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path") or ""
    if isinstance(value, str):
        value = value.encode()
    return hashlib.sha1(bytes(value)).hexdigest()


def select_top_experts(
    inputs: Sequence[str],
    score: ScoreFn,
    top_n: int,
    output: str | Path,
    batch_size: int = 32,
    progress: bool = True,
) -> Path:
    """Score every distinct (image, caption) of `inputs` with `score`, keep the `top_n` best, and write
    `output/images/*.png` and `output/experts.jsonl`. Returns the jsonl path."""
    from tqdm.auto import tqdm

    from diffusion_po.data.preference import decode_image

    if top_n <= 0:
        raise UserError("--top must be positive")
    files = _expand(inputs)
    seen: set[str] = set()
    heap: list[tuple[float, int, str, str, Any]] = []  # (score, order, source, caption, raw value)
    order = 0
    bad = 0
    bar = tqdm(desc="scoring", unit="img", disable=not progress)
    for batch in _candidates(files, batch_size):
        fresh = []
        for source, value, caption, key in batch:
            if key in seen:
                continue
            seen.add(key)
            try:
                fresh.append((source, value, caption, decode_image(value)))
            except Exception:
                bad += 1
        if not fresh:
            continue
        scores = list(score([f[3] for f in fresh], [f[2] for f in fresh]))
        if len(scores) != len(fresh):
            raise ValueError(f"the scorer returned {len(scores)} scores for {len(fresh)} images")
        for (source, value, caption, _img), s in zip(fresh, scores):
            item = (float(s), -order, source, caption, value)
            order += 1
            if len(heap) < top_n:
                heapq.heappush(heap, item)
            elif item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)
        bar.update(len(fresh))
    bar.close()
    if not heap:
        raise DataError(f"no scorable images in {', '.join(files)} ({bad} undecodable)")
    best = sorted(heap, key=lambda x: (x[0], x[1]), reverse=True)
    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    width = len(str(len(best) - 1))
    lines = []
    for rank, (s, _o, source, caption, value) in enumerate(best):
        name = f"images/{rank:0{width}d}.png"
        decode_image(value).save(output / name)
        lines.append(json.dumps({"image": name, "caption": caption, "score": s, "source": source}))
    out = output / "experts.jsonl"
    out.write_text("\n".join(lines) + "\n")
    (output / "selection.json").write_text(json.dumps({
        "inputs": files, "top": top_n, "kept": len(best), "scored": order, "undecodable": bad,
        "min_score": best[-1][0], "max_score": best[0][0],
    }, indent=2))
    return out


def _expand(patterns: Sequence[str]) -> list[str]:
    import glob

    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matches:
            raise DataError(f"input not found: {pattern}")
        files.extend(matches)
    bad = [f for f in files if not f.endswith((".parquet", ".jsonl"))]
    if bad:
        raise DataError(f"inputs must be .parquet or .jsonl files; got {bad[0]}")
    return files


def load_score_fn(spec: str, checkpoint: str | None = None, models_root: str | None = None,
                  device: str | None = None) -> ScoreFn:
    """A scorer by name (pickscore, hps_v2.1, clip, aesthetic, ... from diffusion_po.eval.scorers) or a
    `module:function` import path of a callable `score(images, prompts) -> list[float]`."""
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"cannot import scorer '{spec}': {exc}") from exc
        if not callable(fn):
            raise UserError(f"scorer '{spec}' is not callable")
        return fn
    from diffusion_po.eval.scorers import build_scorer

    options = {"checkpoint": checkpoint} if checkpoint else {}
    scorer = build_scorer(spec, models_root=models_root, device=device, **options)
    return scorer.score


def register_experts(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `experts` (as in `diffusion-po data experts`) to a subparsers object."""
    p = subparsers.add_parser(
        "experts", help="DRO: keep the top-N images of a data set by a scorer",
        description=("Score every (image, caption) of Pick-a-Pic parquet files (both images of each pair) or of an "
                     "images data set, and write the N best as PNGs + experts.jsonl (data.format: images)."),
    )
    p.add_argument("inputs", nargs="+", help="parquet (Pick-a-Pic or image/caption) or jsonl files, or globs")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--top", type=int, default=500, help="how many images to keep (reference: 500)")
    p.add_argument("--scorer", default="pickscore",
                   help="a scorer name (pickscore, hps_v2, hps_v2.1, clip, aesthetic, ...) or module:function")
    p.add_argument("--checkpoint", help="the scorer's checkpoint (local path or hub id)")
    p.add_argument("--models-root", help="folder with offline scorer models")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=run_experts)
    return p


def run_experts(args: argparse.Namespace) -> int:
    score = load_score_fn(args.scorer, args.checkpoint, args.models_root, args.device)
    out = select_top_experts(args.inputs, score, args.top, args.output, batch_size=args.batch_size)
    print(f"wrote {out} (train DRO with data.format: images, data.data_files: [{out}])")
    return 0
