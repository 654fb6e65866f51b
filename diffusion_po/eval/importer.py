"""`eval import`: build a manifest.jsonl for an image folder made by another tool.

Layouts: ``hps`` (``<style>/<index:05d>.jpg|png``, as ``hpsv2.evaluate`` expects), ``flat``
(``<index:05d>.png`` or ``<index:05d>_<k:02d>.png``, index = prompt index), ``geneval``
(``<index:05d>/samples/<k:05d>.png``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from diffusion_po.errors import DataError
from diffusion_po.eval.manifest import MANIFEST, append_jsonl
from diffusion_po.eval.prompts import PromptSet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _row(rel: str, item: Any, k: int) -> dict[str, Any]:
    return {"image": rel, "prompt": item.text, "prompt_index": item.index, "prompt_id": item.id,
            "category": item.category, "k": k}


def import_folder(images: str | Path, prompt_set: PromptSet, layout: str = "flat") -> tuple[Path, int, int]:
    """Write ``<images>/manifest.jsonl``. Returns (manifest path, images found, prompts without image)."""
    root = Path(images)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    target = root / MANIFEST
    if target.exists():
        raise DataError(f"{target} exists already; remove it to rebuild it")
    rows: list[dict[str, Any]] = []
    if layout == "hps":
        by_id = {it.id: it for it in prompt_set}
        for f in sorted(root.glob("*/*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and re.fullmatch(r"\d{5}", f.stem):
                item = by_id.get(f"{f.parent.name}/{f.stem}")
                if item is not None:
                    rows.append(_row(f"{f.parent.name}/{f.name}", item, 0))
    elif layout == "flat":
        for f in sorted(root.iterdir()):
            m = re.fullmatch(r"(\d+)(?:_(\d+))?", f.stem)
            if f.suffix.lower() in IMAGE_SUFFIXES and m and int(m.group(1)) < len(prompt_set):
                rows.append(_row(f.name, prompt_set[int(m.group(1))], int(m.group(2) or 0)))
    elif layout == "geneval":
        for f in sorted(root.glob("*/samples/*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.parent.parent.name.isdigit() and f.stem.isdigit():
                idx = int(f.parent.parent.name)
                if idx < len(prompt_set):
                    rows.append(_row(str(f.relative_to(root)), prompt_set[idx], int(f.stem)))
    else:
        raise DataError(f"unknown layout '{layout}' (hps, flat or geneval)")
    if not rows:
        raise DataError(f"no images of the '{layout}' layout found under {root}")
    append_jsonl(target, rows)
    covered = {r["prompt_index"] for r in rows}
    return target, len(rows), len(prompt_set) - len(covered)


def export_hps(run: str | Path, out: str | Path) -> int:
    """Write the first image (k = 0) of each prompt of a run generated on ``hpsv2:DIR`` in the layout
    ``hpsv2.evaluate`` reads: ``<out>/<style>/<index:05d>.jpg`` (JPEG, quality 95; the official
    evaluator only reads .jpg). Returns the number of images written."""
    from PIL import Image

    from diffusion_po.eval.manifest import read_manifest

    out = Path(out)
    count = 0
    for row in read_manifest(run, require_images=True):
        pid = str(row.get("prompt_id") or "")
        style, _, index = pid.partition("/")
        if not index.isdigit() or not style:
            raise DataError(f"{row['image']}: prompt_id '{pid}' is not '<style>/<index>'; generate with --prompts hpsv2:DIR")
        if int(row.get("k") or 0) != 0:
            continue
        target = out / style / f"{int(index):05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(row["_path"]) as im:
            im.convert("RGB").save(target, format="JPEG", quality=95)
        count += 1
    return count
