"""GenEval: export a generation run in GenEval's folder layout, and summarise its ``results.jsonl``.

GenEval's evaluator (Mask2Former via mmdetection 2.x, CUDA only) runs in its own environment; see
docs/evaluation.md. Layout: ``<out>/<prompt_index:05d>/metadata.jsonl`` (the prompt's metadata line)
and ``<out>/<prompt_index:05d>/samples/<k:05d>.png``. Summary (as ``summary_scores.py``): per-task
accuracy over images, overall = mean of the task accuracies.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

from diffusion_po.errors import DataError
from diffusion_po.eval.manifest import read_jsonl, read_manifest
from diffusion_po.eval.prompts import load_geneval


def export_geneval(run: str | Path, out: str | Path, link: bool = False) -> int:
    """Copy (or hard-link) the images of a run generated on the ``geneval`` prompt set into GenEval's
    layout. Returns the number of images exported."""
    prompts = load_geneval()
    rows = read_manifest(run, require_images=True)
    out = Path(out)
    count = 0
    for row in rows:
        idx = row.get("prompt_index")
        if idx is None or not 0 <= int(idx) < len(prompts):
            raise DataError(f"{row['image']}: no valid prompt_index; generate with --prompts geneval")
        item = prompts[int(idx)]
        if item.text != row["prompt"]:
            raise DataError(f"{row['image']}: prompt differs from GenEval prompt {idx} ('{item.text}')")
        folder = out / f"{int(idx):05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(item.meta))
        src = Path(row["_path"])
        dst = folder / "samples" / f"{int(row.get('k') or 0):05d}.png"
        if dst.exists():
            dst.unlink()
        if src.suffix.lower() != ".png":
            from PIL import Image

            with Image.open(src) as im:
                im.convert("RGB").save(dst)
        elif link:
            dst.hardlink_to(src)
        else:
            shutil.copyfile(src, dst)
        count += 1
    return count


def summarize_geneval(results: str | Path) -> dict[str, Any]:
    """Summary of GenEval's ``results.jsonl`` (rows with ``tag``, ``correct``, ``metadata``)."""
    rows = read_jsonl(Path(results), tolerate_partial_last_line=False)
    if not rows:
        raise DataError(f"{results}: no results")
    for n, r in enumerate(rows, 1):
        if "tag" not in r or "correct" not in r:
            raise DataError(f"{results}: row {n} lacks 'tag' or 'correct' (is this GenEval's results.jsonl?)")
    by_task: OrderedDict[str, list[bool]] = OrderedDict()
    by_prompt: dict[str, bool] = {}
    for r in rows:
        by_task.setdefault(r["tag"], []).append(bool(r["correct"]))
        key = json.dumps(r.get("metadata"), sort_keys=True) if not isinstance(r.get("metadata"), str) else r["metadata"]
        by_prompt[key] = by_prompt.get(key, False) or bool(r["correct"])
    tasks = {t: {"accuracy": sum(v) / len(v), "correct": sum(v), "n": len(v)} for t, v in by_task.items()}
    return {
        "n_images": len(rows),
        "n_prompts": len(by_prompt),
        "correct_images": sum(bool(r["correct"]) for r in rows) / len(rows),
        "correct_prompts": sum(by_prompt.values()) / len(by_prompt),
        "tasks": tasks,
        "overall": sum(t["accuracy"] for t in tasks.values()) / len(tasks),
    }


def format_geneval(summary: dict[str, Any]) -> str:
    lines = [
        f"Total images: {summary['n_images']}",
        f"Total prompts: {summary['n_prompts']}",
        f"% correct images: {100 * summary['correct_images']:.2f}%",
        f"% correct prompts: {100 * summary['correct_prompts']:.2f}%",
        "",
    ]
    for tag, t in summary["tasks"].items():
        lines.append(f"{tag:<16} = {100 * t['accuracy']:.2f}% ({t['correct']} / {t['n']})")
    lines += ["", f"Overall score (avg. over tasks): {summary['overall']:.5f}"]
    return "\n".join(lines)
