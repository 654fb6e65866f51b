"""Prompt sets for benchmarks.

Shipped with the package (``data/``, with their licences): PartiPrompts (1632 prompts, 12 categories)
and the GenEval metadata (553 prompts, 6 tasks). Loaded from local files: Pick-a-Pic v1/v2
``validation_unique`` / ``test_unique`` (a parquet file or folder with a ``caption`` column), the HPSv2
benchmark (``anime.json``, ``concept-art.json``, ``paintings.json``, ``photo.json``: 800 prompts each),
DrawBench (``drawbench.json`` list, or the CSV with ``Prompts``/``Category`` columns), and plain prompt
files (``.txt`` one per line, ``.jsonl``, ``.json``, ``.tsv``/``.csv``, ``.parquet``).

A prompt-set *spec* is a built-in name (``parti``, ``geneval``), ``NAME:PATH`` for the file-based sets
(``pickapic_v2_test_unique:/data/pickapic``, ``hpsv2:/data/HPDv2/benchmark``,
``drawbench:/data/drawbench.json``) or a path to a plain prompt file.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusion_po.errors import DataError

DATA_DIR = Path(__file__).parent / "data"
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
PICKAPIC_SPLITS = ("validation_unique", "test_unique")
BUILTIN = {"parti": "PartiPrompts (1632, shipped)", "geneval": "GenEval metadata (553, shipped)"}
FILE_SETS = {
    "pickapic": "Pick-a-Pic parquet file/folder (column 'caption'); NAME may carry a split, e.g. "
    "pickapic_v2_test_unique:PATH",
    "hpsv2": "HPSv2 benchmark folder with anime/concept-art/paintings/photo .json (800 each)",
    "drawbench": "DrawBench drawbench.json (list) or CSV with Prompts/Category",
}


@dataclass(frozen=True)
class PromptItem:
    """One prompt. ``index`` is its position in the set (drives seeds); ``id`` is a stable name."""

    index: int
    id: str
    text: str
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class PromptSet:
    name: str
    items: list[PromptItem]
    source: str = ""

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, i: int) -> PromptItem:
        return self.items[i]

    @property
    def prompts(self) -> list[str]:
        return [it.text for it in self.items]

    @property
    def categories(self) -> list[str]:
        return sorted({it.category for it in self.items if it.category})

    def subset(self, start: int = 0, limit: int | None = None) -> PromptSet:
        """Items ``start .. start+limit`` (indices, ids and seeds are kept)."""
        stop = None if limit is None else start + limit
        return PromptSet(self.name, self.items[start:stop], self.source)


def _items(texts: list[str], categories: list[str | None] | None = None, metas=None, ids=None) -> list[PromptItem]:
    out = []
    for i, text in enumerate(texts):
        out.append(
            PromptItem(
                index=i,
                id=ids[i] if ids else f"{i:05d}",
                text=text,
                category=categories[i] if categories else None,
                meta=metas[i] if metas else {},
            )
        )
    return out


def _check_nonempty(texts: list[str], source: str) -> None:
    if not texts:
        raise DataError(f"{source}: no prompts found")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{source}: prompt {i} is empty or not a string")


# ------------------------------------------------------------------------------------------ built-ins
def load_parti() -> PromptSet:
    """PartiPrompts: 1632 prompts with Category, Challenge and Note (raw TSV, quotes kept)."""
    path = DATA_DIR / "PartiPrompts.tsv"
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    texts = [r["Prompt"] for r in rows]
    _check_nonempty(texts, str(path))
    metas = [{"challenge": r.get("Challenge", ""), "note": r.get("Note", "") or ""} for r in rows]
    return PromptSet("parti", _items(texts, [r["Category"] for r in rows], metas), str(path))


def load_geneval() -> PromptSet:
    """GenEval: 553 prompts; category = task tag; ``meta`` = the full metadata line (for its evaluator)."""
    path = DATA_DIR / "geneval_evaluation_metadata.jsonl"
    metas = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [m["prompt"] for m in metas]
    return PromptSet("geneval", _items(texts, [m.get("tag") for m in metas], metas), str(path))


# ------------------------------------------------------------------------------------------ file sets
def _parquet_files(path: Path, split: str | None) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such parquet file or folder")
    files = sorted(path.rglob("*.parquet"))
    if split:
        files = [f for f in files if split in f.name or split in f.parent.name]
    if not files:
        raise DataError(f"{path}: no .parquet files{f' for split {split}' if split else ''}")
    return files


def load_pickapic(path: str | Path, split: str | None = None, name: str = "pickapic") -> PromptSet:
    """Unique captions (first-seen order) of a Pick-a-Pic parquet file, or of the files of ``split`` in a
    folder (e.g. the hub layout ``data/test_unique-00000-of-00001-*.parquet``). Only the ``caption``
    column is read."""
    import pyarrow.parquet as pq

    texts: list[str] = []
    for f in _parquet_files(Path(path), split):
        try:
            schema = pq.read_schema(f)
        except Exception as exc:
            raise DataError(f"{f}: not a readable parquet file ({exc})") from exc
        column = next((c for c in ("caption", "prompt", "Prompt", "text") if c in schema.names), None)
        if column is None:
            raise DataError(f"{f}: no 'caption' column (columns: {', '.join(schema.names[:10])})")
        texts.extend(str(x) for x in pq.read_table(f, columns=[column]).column(column).to_pylist())
    texts = list(dict.fromkeys(t for t in texts if t and t.strip()))
    _check_nonempty(texts, str(path))
    return PromptSet(name, _items(texts), str(path))


def load_hpsv2(folder: str | Path, styles: tuple[str, ...] = HPS_STYLES) -> PromptSet:
    """The HPSv2 benchmark: ``<folder>/<style>.json`` lists (800 each, duplicates kept, as the
    leaderboard does). Ids are ``<style>/<index:05d>`` (the ``hpsv2.evaluate`` image layout)."""
    folder = Path(folder)
    if not (folder / f"{styles[0]}.json").is_file() and (folder / "benchmark").is_dir():
        folder = folder / "benchmark"
    items: list[PromptItem] = []
    for style in styles:
        f = folder / f"{style}.json"
        if not f.is_file():
            raise DataError(f"{f} is missing; expected the HPSv2 benchmark files {', '.join(s + '.json' for s in styles)}")
        try:
            texts = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{f}: invalid JSON ({exc})") from exc
        if not isinstance(texts, list):
            raise DataError(f"{f}: expected a JSON list of prompts")
        _check_nonempty(texts, str(f))
        for j, text in enumerate(texts):
            items.append(PromptItem(len(items), f"{style}/{j:05d}", text, style, {"style_index": j}))
    return PromptSet("hpsv2", items, str(folder))


def load_drawbench(path: str | Path) -> PromptSet:
    """DrawBench (200 prompts): ``drawbench.json`` (list of strings or of {prompt, category}) or the CSV."""
    path = Path(path)
    if path.is_dir():
        path = path / "drawbench.json"
    if not path.is_file():
        raise DataError(f"{path}: no DrawBench file")
    return _load_table(path, "drawbench")


def _pick(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    for n in names:
        if n in row and row[n] not in (None, ""):
            return row[n]
    return None


_TEXT_KEYS = ("prompt", "Prompt", "Prompts", "caption", "text")
_CAT_KEYS = ("category", "Category", "tag", "style")


def _load_table(path: Path, name: str) -> PromptSet:
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]]
    if suffix == ".txt":
        texts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        _check_nonempty(texts, str(path))
        return PromptSet(name, _items(texts), str(path))
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{n}: invalid JSON ({exc})") from exc
            rows.append(row if isinstance(row, dict) else {"prompt": row})
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{path}: invalid JSON ({exc})") from exc
        if isinstance(data, dict) and "prompts" in data:
            data = data["prompts"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of prompts")
        rows = [r if isinstance(r, dict) else {"prompt": r} for r in data]
    elif suffix in (".tsv", ".csv"):
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".parquet":
        return load_pickapic(path, name=name)
    else:
        raise DataError(f"{path}: unsupported prompt file type (use .txt, .jsonl, .json, .tsv, .csv or .parquet)")
    texts, cats, ids = [], [], []
    for n, row in enumerate(rows):
        text = _pick(row, _TEXT_KEYS)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {n} has no prompt (expected one of the keys {', '.join(_TEXT_KEYS)})")
        texts.append(text)
        cat = _pick(row, _CAT_KEYS)
        cats.append(str(cat) if cat is not None else None)
        ids.append(str(row["id"]) if "id" in row else f"{n:05d}")
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate prompt ids")
    has_cat = any(c is not None for c in cats)
    return PromptSet(name, _items(texts, cats if has_cat else None, None, ids), str(path))


def load_prompt_file(path: str | Path) -> PromptSet:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist")
    return _load_table(path, path.stem)


# --------------------------------------------------------------------------------------------- spec
def load_prompt_set(spec: str) -> PromptSet:
    """Load a prompt set from its spec (see the module docstring)."""
    spec = spec.strip()
    low = spec.lower()
    if low in ("parti", "partiprompts", "parti-prompts", "parti_prompts"):
        return load_parti()
    if low == "geneval":
        return load_geneval()
    name, sep, rest = spec.partition(":")
    key = name.lower()
    if sep and rest and (key.startswith("pickapic") or key in ("hpsv2", "hps", "drawbench", "file")):
        if key.startswith("pickapic"):
            split = next((s for s in PICKAPIC_SPLITS if key.endswith(s)), None)
            return load_pickapic(rest, split=split, name=key)
        if key in ("hpsv2", "hps"):
            return load_hpsv2(rest)
        if key == "drawbench":
            return load_drawbench(rest)
        return load_prompt_file(rest)
    if Path(spec).expanduser().exists():
        return load_prompt_file(spec)
    if key.startswith("pickapic") or key in ("hpsv2", "hps", "drawbench"):
        raise DataError(
            f"prompt set '{spec}' is not shipped; give its local files as '{key}:PATH' "
            "(see `diffusion-po eval prompts`)"
        )
    raise DataError(
        f"unknown prompt set '{spec}': use parti, geneval, pickapic_v2_test_unique:PATH, hpsv2:DIR, "
        "drawbench:PATH or a prompt file (.txt, .jsonl, .json, .tsv, .csv, .parquet)"
    )


def prompt_rows(spec: str) -> list[dict[str, Any]]:
    """The prompts of a set as `diffusion-po sample` rows (`diffusion_po.sampling.io.PromptRow`, no negatives)."""
    return [{"prompt": it.text, "id": it.id, "negatives": [], "positives": []} for it in load_prompt_set(spec)]


__all__ = [
    "BUILTIN", "DATA_DIR", "FILE_SETS", "HPS_STYLES", "PromptItem", "PromptSet", "load_drawbench",
    "load_geneval", "load_hpsv2", "load_parti", "load_pickapic", "load_prompt_file", "load_prompt_set",
    "prompt_rows",
]
