"""Small synthetic data sets in the real formats, for tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow"]
RGB = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def jpeg_bytes(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 32), noise_seed: int = 0) -> bytes:
    rng = np.random.default_rng(noise_seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def pickapic_rows(n: int, seed: int = 0, ties: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "caption_0", "caption_1")}
    for i in range(n):
        good, bad = rng.choice(COLOURS, 2, replace=False)
        label = 0.5 if i < ties else float(rng.integers(0, 2))
        first, second = (good, bad) if label >= 0.5 else (bad, good)
        rows["caption"].append(f"a {good} square")
        rows["jpg_0"].append(jpeg_bytes(RGB[first], noise_seed=2 * i))
        rows["jpg_1"].append(jpeg_bytes(RGB[second], noise_seed=2 * i + 1))
        rows["label_0"].append(label)
        rows["label_1"].append(1.0 - label)
        rows["caption_0"].append(f"a {first} square")
        rows["caption_1"].append(f"a {second} square")
    return rows


def write_pickapic(path: str | Path, n: int = 16, seed: int = 0, ties: int = 0, corrupt: list[int] | None = None,
                   drop_columns: list[str] | None = None) -> Path:
    rows = pickapic_rows(n, seed, ties)
    for i in corrupt or []:
        rows["jpg_1"][i] = b"not a jpeg"
    for col in drop_columns or []:
        rows.pop(col)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path
