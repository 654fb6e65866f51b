"""Prompt files in, PNGs with metadata, `manifest.jsonl` and a grid out."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from diffusion_po.errors import DataError
from diffusion_po.sampling.sampler import weighted
from diffusion_po.sampling.weights import checked_weight, parse_weighted

PromptRow = dict[str, Any]  # {"prompt", optional "negative_prompt", "positive_prompts", "seeds", "id"}


def seed_for(base_seed: int, prompt_index: int, n: int, k: int) -> int:
    """Seed of image ``k`` of prompt ``prompt_index`` with ``n`` images per prompt: ``base + prompt_index * n + k``
    (`diffusion-po sample` and `eval generate` alike, so the two give the same image for the same settings)."""
    return int(base_seed) + int(prompt_index) * int(n) + int(k)


def _weighted_field(value: Any, where: str) -> list[tuple[str, float]]:
    """A jsonl field: "text", ["a", "b"], [["a", 1.5]], or [{"text": "a", "weight": 1.5}]."""
    if value is None:
        return []
    if isinstance(value, str):
        return [parse_weighted(value)]
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a string or a list, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, dict):
            if "text" not in v:
                raise DataError(f"{where}: an entry {v} has no 'text'")
            out.append((str(v["text"]), checked_weight(v.get("weight", 1.0), f"{where}: {v['text']}")))
        elif isinstance(v, (list, tuple)) and len(v) == 2:
            out.append((str(v[0]), checked_weight(v[1], f"{where}: {v[0]}")))
        elif isinstance(v, str):
            out.append(parse_weighted(v))
        else:
            raise DataError(f"{where}: cannot read entry {v!r}; use \"text\", [\"text\", weight] or {{\"text\", \"weight\"}}")
    return out


def read_prompt_file(path: str | Path) -> list[PromptRow]:
    """Prompts from a .txt (one per line, blank lines skipped) or .jsonl file (one object per line with
    "prompt" (or "caption"/"text"), optional "negative_prompt", "positive_prompts", "seeds", "id")."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file '{path}' does not exist")
    rows: list[PromptRow] = []
    if p.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if isinstance(obj, str):
                obj = {"prompt": obj}
            text = obj.get("prompt", obj.get("caption", obj.get("text")))
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: no 'prompt' string (keys: {', '.join(obj)})")
            row: PromptRow = {"prompt": text, "id": obj.get("id", len(rows))}
            row["negatives"] = _weighted_field(obj.get("negative_prompt", obj.get("negative_prompts")), f"{path}:{n}")
            row["positives"] = _weighted_field(obj.get("positive_prompts"), f"{path}:{n}")
            if "seeds" in obj or "seed" in obj:
                seeds = obj.get("seeds", obj.get("seed"))
                row["seeds"] = [int(s) for s in (seeds if isinstance(seeds, list) else [seeds])]
            rows.append(row)
    elif p.suffix.lower() in (".txt", ".csv", ""):
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append({"prompt": line.strip(), "id": len(rows), "negatives": [], "positives": []})
    else:
        raise DataError(f"prompt file '{path}': use .txt (one prompt per line) or .jsonl")
    if not rows:
        raise DataError(f"prompt file '{path}' has no prompts")
    return rows


def png_info(meta: dict[str, Any]):
    """PNG text chunks: 'prompt', 'negative_prompt', 'seed', and all settings as JSON under 'diffusion_po'."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", str(meta.get("prompt", "")))
    negs = meta.get("negatives") or []
    info.add_text("negative_prompt", ", ".join(f"{t}:{w:g}" if w != 1 else t for t, w in negs))
    info.add_text("seed", str(meta.get("seed", "")))
    info.add_text("diffusion_po", json.dumps(meta, sort_keys=True))
    return info


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    """The settings a PNG was generated with (the 'diffusion_po' text chunk)."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or im.info)
    return json.loads(text["diffusion_po"]) if "diffusion_po" in text else {}


def make_grid(images: list[Any], cols: int) -> Any:
    """Tile equally sized PIL images row-major, `cols` per row."""
    from PIL import Image

    if not images:
        raise ValueError("no images for the grid")
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid


__all__ = ["make_grid", "parse_weighted", "png_info", "read_png_metadata", "read_prompt_file", "seed_for",
           "weighted"]
