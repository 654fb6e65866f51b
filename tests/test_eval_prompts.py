"""Prompt sets: shipped PartiPrompts and GenEval, and the loaders for local Pick-a-Pic, HPSv2, DrawBench
and plain prompt files."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from diffusion_po.cli import main
from diffusion_po.errors import DataError
from diffusion_po.eval.prompts import (
    DATA_DIR,
    HPS_STYLES,
    load_drawbench,
    load_geneval,
    load_hpsv2,
    load_parti,
    load_pickapic,
    load_prompt_set,
)


def test_parti_is_shipped_with_categories_and_licence():
    ps = load_parti()
    assert len(ps) == 1632
    assert len(ps.categories) == 12 and "People" in ps.categories
    counts = Counter(it.category for it in ps)
    assert counts["Animals"] == 314 and sum(counts.values()) == 1632
    # quotes inside prompts are kept verbatim (the TSV is not CSV-quoted)
    assert any(it.text.startswith('"G I G G L E"') for it in ps)
    assert [it.index for it in ps] == list(range(1632))
    assert (DATA_DIR / "PartiPrompts.LICENSE").is_file() and (DATA_DIR / "ATTRIBUTION.md").is_file()
    assert load_prompt_set("parti").prompts == ps.prompts


def test_geneval_metadata_is_shipped():
    ps = load_geneval()
    assert len(ps) == 553
    counts = Counter(it.category for it in ps)
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                      "color_attr": 100}
    assert ps[0].meta["prompt"] == ps[0].text and "include" in ps[0].meta
    assert (DATA_DIR / "geneval.LICENSE").is_file()


def test_pickapic_parquet_file_and_split_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "pickapic" / "data"
    data.mkdir(parents=True)
    # duplicated captions (several image pairs per prompt) -> unique, first-seen order
    pq.write_table(pa.table({"caption": ["b cat", "a dog", "b cat", "c"], "label_0": [1, 0, 1, 0]}),
                   data / "test_unique-00000-of-00001.parquet")
    pq.write_table(pa.table({"caption": ["v1", "v2"]}), data / "validation_unique-00000-of-00001.parquet")
    ps = load_prompt_set(f"pickapic_v2_test_unique:{tmp_path / 'pickapic'}")
    assert ps.prompts == ["b cat", "a dog", "c"]
    assert load_prompt_set(f"pickapic_v2_validation_unique:{tmp_path / 'pickapic'}").prompts == ["v1", "v2"]
    assert load_pickapic(data / "test_unique-00000-of-00001.parquet").prompts == ["b cat", "a dog", "c"]
    pq.write_table(pa.table({"other": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="no 'caption' column"):
        load_pickapic(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="not shipped"):
        load_prompt_set("pickapic_v2_test_unique")


def test_hpsv2_benchmark_folder(tmp_path):
    bench = tmp_path / "HPDv2" / "benchmark"
    bench.mkdir(parents=True)
    for style in HPS_STYLES:
        (bench / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(5)] + [f"{style} 0"]))
    ps = load_hpsv2(tmp_path / "HPDv2")  # finds the benchmark/ sub-folder
    assert len(ps) == 24 and ps.categories == sorted(HPS_STYLES)
    assert ps[6].id == "concept-art/00000" and ps[11].text == "concept-art 0"  # duplicates kept
    assert load_prompt_set(f"hpsv2:{bench}").prompts == ps.prompts
    (bench / "photo.json").unlink()
    with pytest.raises(DataError, match="photo.json"):
        load_hpsv2(bench)


def test_drawbench_json_and_csv(tmp_path):
    (tmp_path / "drawbench.json").write_text(json.dumps(["a", "b", "c"]))
    assert load_drawbench(tmp_path).prompts == ["a", "b", "c"]
    with open(tmp_path / "drawbench.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Prompts", "Category"])
        w.writerow(["a red cube", "Colors"])
        w.writerow(["two cats", "Counting"])
    ps = load_prompt_set(f"drawbench:{tmp_path / 'drawbench.csv'}")
    assert ps.prompts == ["a red cube", "two cats"] and ps.categories == ["Colors", "Counting"]


def test_plain_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\n two \nthree\n")
    assert load_prompt_set(str(tmp_path / "p.txt")).prompts == ["one", "two", "three"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x", "category": "c1", "id": "a"}\n{"caption": "y"}\n')
    ps = load_prompt_set(str(tmp_path / "p.jsonl"))
    assert ps.prompts == ["x", "y"] and ps[0].id == "a" and ps[0].category == "c1" and ps[1].category is None
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{"nope": 1}\n')
    with pytest.raises(DataError, match="row 1 has no prompt"):
        load_prompt_set(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="unknown prompt set"):
        load_prompt_set("no-such-set")
    assert load_prompt_set("parti").subset(10, 3).items[0].index == 10


def test_prompts_cli(capsys):
    assert main(["eval", "prompts"]) == 0
    assert "parti" in capsys.readouterr().out
    assert main(["eval", "prompts", "geneval", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "553 prompts" in out and "counting (80)" in out
    assert main(["eval", "prompts", "nope"]) == 2
