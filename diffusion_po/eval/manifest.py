"""Image-run manifests: ``<run>/manifest.jsonl``, one JSON object per image.

Required keys: ``image`` (path relative to the run folder, or absolute; ``file``, as `diffusion-po sample`
writes it, is read as ``image``) and ``prompt``. Optional:
``prompt_index``, ``prompt_id``, ``k`` (sample number within the prompt), ``seed``, ``category`` and
any generation settings. ``eval generate`` writes all of them; other tools (e.g. the toy world) only
need ``image`` + ``prompt`` (+ ``prompt_id``/``k`` or ``seed`` for pairing two runs).

Two runs are paired by :func:`pair_key`: ``(prompt_id or prompt_index or prompt, k or seed or the
occurrence number of that prompt)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from diffusion_po.errors import DataError

MANIFEST = "manifest.jsonl"
RUN_INFO = "run.json"


def read_jsonl(path: Path, *, tolerate_partial_last_line: bool = True) -> list[dict[str, Any]]:
    """Rows of a JSONL file; truncated lines left by an interrupted write are ignored."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            # a write cut short by an interruption: the last line, or a line that a later append
            # terminated (a truncated object does not end with '}')
            if tolerate_partial_last_line and (n == len(lines) or not line.rstrip().endswith("}")):
                continue
            raise DataError(f"{path}:{n}: invalid JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        rows.append(row)
    return rows


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows in one write and flush to disk, so an interruption loses at most this write."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not text:
        return
    # a previous interrupted write may have left a partial line without newline: terminate it
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                text = "\n" + text
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def manifest_path(run: str | Path) -> Path:
    run = Path(run)
    return run if run.suffix == ".jsonl" else run / MANIFEST


def read_manifest(run: str | Path, require_images: bool = False) -> list[dict[str, Any]]:
    """Validated manifest rows of a run folder (or a manifest file). Each row gets ``_path`` (absolute
    image path); later rows for the same image replace earlier ones."""
    path = manifest_path(run)
    if not path.is_file():
        raise DataError(
            f"{path} not found: an image run needs a manifest.jsonl (one JSON object per image with "
            "'image' and 'prompt'); `diffusion-po eval generate` writes one, `eval import` builds one"
        )
    base = path.parent
    by_image: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(read_jsonl(path), 1):
        if "image" not in row and isinstance(row.get("file"), str):  # `diffusion-po sample`'s manifest
            row["image"] = row["file"]
        for key in ("image", "prompt"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise DataError(f"{path}: row {n} has no '{key}' string")
        img = Path(row["image"])
        row["_path"] = str(img if img.is_absolute() else base / img)
        if require_images and not Path(row["_path"]).is_file():
            raise DataError(f"{path}: row {n}: image {row['_path']} does not exist")
        by_image[row["image"]] = row
    rows = list(by_image.values())
    if not rows:
        raise DataError(f"{path} is empty")
    return rows


def pair_keys(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The pairing key of each row (see the module docstring)."""
    seen: dict[str, int] = {}
    keys = []
    for row in rows:
        if row.get("prompt_id") not in (None, ""):
            pkey = f"id:{row['prompt_id']}"
        elif row.get("prompt_index") is not None:
            pkey = f"idx:{row['prompt_index']}"
        else:
            pkey = f"text:{row['prompt']}"
        if row.get("k") is not None:
            skey = f"k:{row['k']}"
        elif row.get("seed") is not None:
            skey = f"seed:{row['seed']}"
        else:
            n = seen.get(pkey, 0)
            seen[pkey] = n + 1
            skey = f"n:{n}"
        keys.append((pkey, skey))
    return keys


def group_key(row: dict[str, Any]) -> str:
    """The prompt a row belongs to (the unit of the cluster bootstrap)."""
    for key in ("prompt_id", "prompt_index"):
        if row.get(key) not in (None, ""):
            return f"{key}:{row[key]}"
    return f"prompt:{row['prompt']}"
