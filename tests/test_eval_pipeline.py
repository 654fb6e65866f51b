"""Benchmark runs end to end on tiny models: seed-paired resumable generation, resumable scoring in
DataLoader workers, paired comparisons, HPS leaderboard numbers, reports, GenEval and folder import."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_po.cli import main
from diffusion_po.errors import DataError, UserError
from diffusion_po.eval.compare import compare_tables, hps_leaderboard
from diffusion_po.eval.generate import GenerateConfig, generate_images, load_generation_pipeline, seed_for
from diffusion_po.eval.manifest import append_jsonl, read_jsonl, read_manifest
from diffusion_po.eval.scorers import build_scorer, parse_checkpoint_options
from diffusion_po.eval.scoring import load_score_table, score_run
from diffusion_po.eval.stats import sigmoid
from diffusion_po.eval.testing import build_tiny_models_root, tiny_checkpoint_options

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp() / "eval_tiny_models"
    if not (base / "aesthetic").is_dir():
        build_tiny_models_root(base)
    return base


@pytest.fixture(scope="module")
def other_sd(tmp_path_factory) -> str:
    """A second tiny SD pipeline (different random weights) to play the baseline."""
    from diffusion_po.tiny import save_tiny_pipeline

    return str(save_tiny_pipeline("sd", tmp_path_factory.mktemp("other_sd"), seed=1))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    rows = [("a red cube", "shapes"), ("a blue ball", "shapes"), ("a green tree", "nature"), ("a dog", "animals")]
    path.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in rows))
    return str(path)


class CountingPipe:
    """Wraps a pipeline: counts images generated, optionally fails after some calls (an interruption)."""

    def __init__(self, pipe, fail_after: int | None = None):
        self.pipe, self.fail_after, self.calls, self.images = pipe, fail_after, 0, 0

    def __call__(self, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.images += len(kwargs["prompt"])
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def _load(path):
    return np.asarray(Image.open(path), dtype=np.int16)


# ------------------------------------------------------------------------------------------- generation
def test_seed_formula():
    assert seed_for(100, 0, 4, 0) == 100
    assert seed_for(100, 3, 4, 2) == 100 + 3 * 4 + 2
    seeds = {seed_for(0, i, 3, k) for i in range(50) for k in range(3)}
    assert len(seeds) == 150  # no two images share a seed


def test_generation_pairs_seeds_and_is_batch_invariant(tiny_sd, other_sd, prompt_file, tmp_path):
    cfg = GenerateConfig(model=tiny_sd, prompts=prompt_file, n=2, seed=7, steps=2)
    run1 = generate_images(cfg, tmp_path / "b1", batch_size=1, progress=False)
    run4 = generate_images(cfg, tmp_path / "b4", batch_size=3, progress=False)
    base = generate_images(GenerateConfig(model=other_sd, prompts=prompt_file, n=2, seed=7, steps=2),
                           tmp_path / "other", batch_size=3, progress=False)
    rows1 = sorted(read_manifest(run1), key=lambda r: r["image"])
    rows4 = sorted(read_manifest(run4), key=lambda r: r["image"])
    rows_b = sorted(read_manifest(base), key=lambda r: r["image"])
    assert len(rows1) == 8
    for r1, r4, rb in zip(rows1, rows4, rows_b):
        assert r1["seed"] == r4["seed"] == rb["seed"] == seed_for(7, r1["prompt_index"], 2, r1["k"])
        assert r1["prompt"] == rb["prompt"]
        # same model + seed -> same image whatever the batch composition
        assert np.abs(_load(r1["_path"]) - _load(r4["_path"])).max() <= 2
    # different seeds give different images (the pairing is not vacuous)
    assert np.abs(_load(rows1[0]["_path"]) - _load(rows1[1]["_path"])).mean() > 5
    assert np.abs(_load(rows1[0]["_path"]) - _load(rows_b[0]["_path"])).mean() > 1


def test_generation_resumes_without_redoing_images(tiny_sd, prompt_file, tmp_path):
    cfg = GenerateConfig(model=tiny_sd, prompts=prompt_file, n=2, seed=0, steps=2)
    pipe = load_generation_pipeline(cfg, "cpu")
    first = CountingPipe(pipe, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        generate_images(cfg, tmp_path / "run", batch_size=3, pipe=first, progress=False)
    assert first.images == 6
    done_before = {r["image"]: Path(r["_path"]).stat().st_mtime_ns for r in read_manifest(tmp_path / "run")}
    assert len(done_before) == 6
    second = CountingPipe(pipe)
    generate_images(cfg, tmp_path / "run", batch_size=3, pipe=second, progress=False)
    assert second.images == 2  # only the missing ones
    rows = read_manifest(tmp_path / "run")
    assert len(rows) == 8 and len(read_jsonl(tmp_path / "run" / "manifest.jsonl")) == 8
    for r in rows:
        if r["image"] in done_before:
            assert Path(r["_path"]).stat().st_mtime_ns == done_before[r["image"]]
    third = CountingPipe(pipe)
    generate_images(cfg, tmp_path / "run", pipe=third, progress=False)
    assert third.calls == 0
    with pytest.raises(UserError, match="other settings"):
        generate_images(GenerateConfig(model=tiny_sd, prompts=prompt_file, n=2, seed=1, steps=2), tmp_path / "run",
                        pipe=pipe, progress=False)


def test_partial_manifest_line_is_tolerated(tmp_path):
    path = tmp_path / "manifest.jsonl"
    append_jsonl(path, [{"image": "a.png", "prompt": "x"}])
    with open(path, "a") as fh:
        fh.write('{"image": "b.png", "pro')  # interrupted write
    assert [r["image"] for r in read_jsonl(path)] == ["a.png"]
    append_jsonl(path, [{"image": "c.png", "prompt": "z"}])
    assert [r["image"] for r in read_jsonl(path)] == ["a.png", "c.png"]


# ------------------------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def scored_pair(tiny_sd, other_sd, prompt_file, tmp_path_factory):
    """Two generated runs (A = tiny_sd, B = other_sd), same prompts and seeds."""
    root = tmp_path_factory.mktemp("pair")
    a = generate_images(GenerateConfig(model=tiny_sd, prompts=prompt_file, n=2, steps=2), root / "A", progress=False)
    b = generate_images(GenerateConfig(model=other_sd, prompts=prompt_file, n=2, steps=2), root / "B", progress=False)
    return a, b


def _scorers(models_root, names=("pickscore", "hps_v2.1")):
    opts = parse_checkpoint_options(tiny_checkpoint_options(models_root))
    return [build_scorer(n, models_root=models_root, **opts.get(n, {})) for n in names]


def test_scoring_matches_in_memory_scores_and_workers(scored_pair, models_root, tmp_path):
    run, _ = scored_pair
    scorers = _scorers(models_root)
    meta = score_run(run, scorers, tmp_path / "w0", batch_size=3, num_workers=0, progress=False)
    score_run(run, scorers, tmp_path / "w2", batch_size=3, num_workers=2, progress=False)
    rows0, meta0 = load_score_table(tmp_path / "w0")
    rows2, _ = load_score_table(tmp_path / "w2")
    assert len(rows0) == 8 and meta["throughput"]["images_scored"] == 8
    assert set(meta0["scorers"]) == {"pickscore", "hps_v2.1"}
    for r0, r2 in zip(rows0, rows2):
        assert r0["image"] == r2["image"]
        for m in ("pickscore", "pickscore_cos", "hps_v2.1"):
            assert r0[m] == pytest.approx(r2[m], rel=1e-5, abs=1e-5)
    # against the in-memory API on the decoded files
    images = [Image.open(Path(run) / r["image"]).convert("RGB") for r in rows0]
    direct = scorers[0].score_all(images, [r["prompt"] for r in rows0])
    np.testing.assert_allclose([r["pickscore"] for r in rows0], direct["pickscore"], rtol=1e-4, atol=1e-4)
    long_rows = read_jsonl(tmp_path / "w0" / "scores.jsonl")
    assert len(long_rows) == 16 and all(r["checkpoint_hash"].startswith("sha256:") and r["version"] for r in long_rows)


def test_scoring_resumes_and_adds_metrics_without_rescoring(scored_pair, models_root, tmp_path):
    run, _ = scored_pair
    (pick,) = _scorers(models_root, ("pickscore",))
    calls = {"n": 0}
    original = pick.score_pixels

    def failing(pixels, prompts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return original(pixels, prompts)

    pick.score_pixels = failing
    with pytest.raises(KeyboardInterrupt):
        score_run(run, [pick], tmp_path, batch_size=3, num_workers=0, progress=False)
    assert len(read_jsonl(tmp_path / "scores.jsonl")) == 3

    scored = []
    pick.score_pixels = lambda pixels, prompts: (scored.append(len(prompts)), original(pixels, prompts))[1]
    meta = score_run(run, [pick], tmp_path, batch_size=3, num_workers=0, progress=False)
    assert sum(scored) == 5 and meta["throughput"]["images_scored"] == 5

    scored.clear()
    scorers = _scorers(models_root, ("hps_v2.1",)) + [pick]
    score_run(run, scorers, tmp_path, batch_size=4, num_workers=0, progress=False)
    assert sum(scored) == 0  # pickscore is not redone when hps is added
    rows, meta = load_score_table(tmp_path)
    assert all(r["pickscore"] is not None and r["hps_v2.1"] is not None for r in rows)
    assert set(meta["scorers"]) == {"pickscore", "hps_v2.1"}


def test_unreadable_image_is_a_clear_error(scored_pair, models_root, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(scored_pair[0], run)
    bad = read_manifest(run)[2]["_path"]
    Path(bad).write_bytes(b"not a png")
    scorers = _scorers(models_root, ("pickscore",))
    with pytest.raises(DataError, match=r"00001_00.png: cannot read image"):
        score_run(run, scorers, batch_size=4, num_workers=0, progress=False)
    meta = score_run(run, scorers, batch_size=4, num_workers=0, progress=False, skip_bad_images=True)
    assert len(meta["unreadable_images"]) == 1
    rows, _ = load_score_table(run)
    assert sum(r["pickscore"] is None for r in rows) == 1


# ------------------------------------------------------------------------------------------- comparison
def _table(values, prompts=None, categories=None, metric="pickscore"):
    return [
        {"image": f"{i}.png", "prompt": (prompts or [f"p{i}" for i in range(len(values))])[i], "prompt_index": i,
         "k": 0, "seed": i, "category": categories[i] if categories else None, metric: float(v)}
        for i, v in enumerate(values)
    ]


def test_compare_known_case():
    rng = np.random.default_rng(0)
    b = rng.normal(20, 1, size=40)
    a = b + np.where(np.arange(40) < 30, 1.0, -1.0)  # A wins 30 of 40 by exactly 1
    a[0] = b[0]  # one tie
    cats = ["x"] * 20 + ["y"] * 20
    res = compare_tables(_table(a, categories=cats), _table(b, categories=cats), ["pickscore"], n_boot=500)
    e = res["metrics"]["pickscore"]
    assert e["win_rate"]["wins"] == 29 and e["win_rate"]["ties"] == 1 and e["win_rate"]["losses"] == 10
    assert e["win_rate"]["win_rate"] == pytest.approx(29.5 / 40)
    assert e["a"]["mean"] == pytest.approx(a.mean()) and e["b"]["median"] == pytest.approx(np.median(b))
    assert e["diff"]["mean"] == pytest.approx((a - b).mean())
    assert e["soft_win"]["value"] == pytest.approx(sigmoid(a - b).mean())
    assert e["by_category"]["x"]["win_rate"] == pytest.approx(19.5 / 20)
    assert e["by_category"]["y"]["win_rate"] == pytest.approx(10 / 20)
    assert res["pairing"]["seed_paired"]


def test_compare_pairs_by_prompt_and_seed_not_by_order():
    a = _table([3.0, 1.0, 2.0])
    b = list(reversed(_table([2.0, 0.0, 1.0])))  # same pairs, other order
    res = compare_tables(a, b, ["pickscore"], n_boot=100)
    assert res["metrics"]["pickscore"]["win_rate"]["win_rate"] == 1.0
    c = _table([1.0, 1.0, 1.0], prompts=["q0", "q1", "q2"])
    with pytest.raises(DataError, match="no image of A pairs"):
        compare_tables(a, c, ["pickscore"], n_boot=10)
    with pytest.raises(DataError, match="not in the score table"):
        compare_tables(a, b, ["hps_v2.1"], n_boot=10)


def test_hps_leaderboard_numbers():
    rows, vals = [], {}
    rng = np.random.default_rng(1)
    idx = 0
    for style in ("anime", "concept-art", "paintings", "photo"):
        v = rng.normal(27, 2, size=40)
        vals[style] = v
        for x in v:
            rows.append({"image": f"{idx}.jpg", "prompt": "p", "prompt_index": idx, "category": style, "hps_v2": x})
            idx += 1
    lb = hps_leaderboard(rows, "hps_v2")
    for style, v in vals.items():
        chunk_means = [v[i : i + 4].mean() for i in range(0, 40, 4)]  # 10 chunks of 4
        assert lb["styles"][style]["mean"] == pytest.approx(np.mean(chunk_means))
        assert lb["styles"][style]["chunk_std"] == pytest.approx(np.std(chunk_means))
    assert lb["average"] == pytest.approx(np.concatenate(list(vals.values())).mean())
    assert lb["complete"]
    assert hps_leaderboard(_table([1.0]), "pickscore") is None


def test_report_has_hps_leaderboard_table(tmp_path):
    from diffusion_po.eval.report import write_report

    rng = np.random.default_rng(2)
    rows_a, rows_b = [], []
    for i, style in enumerate(["anime", "concept-art", "paintings", "photo"] * 10):
        common = {"image": f"{i}.png", "prompt": f"p{i}", "prompt_index": i, "k": 0, "seed": i, "category": style}
        rows_a.append({**common, "hps_v2.1": float(rng.normal(28, 1))})
        rows_b.append({**common, "hps_v2.1": float(rng.normal(27, 1))})
    result = compare_tables(rows_a, rows_b, ["hps"], n_boot=100)
    lb = result["metrics"]["hps_v2.1"]["hps_benchmark"]
    assert lb["a"]["average"] == pytest.approx(np.mean([r["hps_v2.1"] for r in rows_a]))
    report = write_report(result, tmp_path, rows_a, rows_b).read_text()
    assert "| model | anime | concept-art | paintings | photo | Average |" in report
    assert f"{lb['b']['average']:.2f} |" in report
    assert json.loads((tmp_path / "compare.json").read_text())["metrics"]["hps_v2.1"]["n_pairs"] == 40


# ------------------------------------------------------------------------------------------- end to end
def test_benchmark_cli_end_to_end_report(tiny_sd, other_sd, models_root, tmp_path, capsys):
    ck = ["--checkpoint", tiny_checkpoint_options(models_root)[0]]
    out = tmp_path / "bench"
    argv = ["eval", "benchmark", "--model", tiny_sd, "--baseline", other_sd, "--prompts", "parti", "--limit", "6",
            "--n", "2", "--steps", "2", "--metrics", "pickscore,hps_v2.1", "--models-root", str(models_root), *ck,
            "--out", str(out), "--n-boot", "200", "--num-workers", "0", "--label-a", "tuned", "--label-b", "base"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    for needle in ("## Summary", "win rate of tuned", "| pickscore |", "| hps_v2.1 |", "## Scorers",
                   "## Scoring throughput", "by category", "| Abstract |", "same seeds on both sides"):
        assert needle in report, needle
    for plot in ("hist_pickscore.png", "hist_hps_v2.1.png", "categories_pickscore.png"):
        assert (out / "plots" / plot).stat().st_size > 1000
    result = json.loads((out / "compare.json").read_text())
    e = result["metrics"]["pickscore"]
    assert e["n_pairs"] == 12 and e["n_prompts"] == 6 and "soft_win" in e
    rows_a, _ = load_score_table(out / "A")
    rows_b, _ = load_score_table(out / "B")
    wins = sum(ra["pickscore"] > rb["pickscore"] for ra, rb in zip(rows_a, rows_b))
    ties = sum(ra["pickscore"] == rb["pickscore"] for ra, rb in zip(rows_a, rows_b))
    assert e["win_rate"]["win_rate"] == pytest.approx((wins + 0.5 * ties) / 12)
    assert "tuned vs base" in capsys.readouterr().out
    # rerun: nothing regenerated or rescored, same result
    assert main(argv) == 0
    assert json.loads((out / "compare.json").read_text())["metrics"]["pickscore"]["win_rate"] == e["win_rate"]


def test_compare_two_external_folders_with_minimal_manifests(models_root, tmp_path, capsys):
    """The toy-world use: two image folders whose manifests only have image, prompt and seed."""
    rng = np.random.default_rng(0)
    for side in ("base", "dpo"):
        folder = tmp_path / side
        folder.mkdir()
        rows = []
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
            rows.append({"image": f"img{i}.png", "prompt": ["a circle", "a square"][i % 2], "seed": 100 + i})
        append_jsonl(folder / "manifest.jsonl", rows)
    ck = ["--checkpoint", tiny_checkpoint_options(models_root)[0]]
    for side in ("base", "dpo"):
        assert main(["eval", "score", "--images", str(tmp_path / side), "--metrics", "pickscore,hps_v2.1",
                     "--models-root", str(models_root), *ck, "--num-workers", "0"]) == 0
    assert main(["eval", "compare", "--a", str(tmp_path / "dpo"), "--b", str(tmp_path / "base"),
                 "--metrics", "pickscore,hps", "--n-boot", "100", "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "dpo vs base: 6 pairs" in out and "hps_v2.1" in out
    assert (tmp_path / "cmp" / "report.md").is_file()
    # the one-shot benchmark on the same two folders: scores go next to the report, not into the folders
    assert main(["eval", "benchmark", "--a-images", str(tmp_path / "dpo"), "--b-images", str(tmp_path / "base"),
                 "--metrics", "pickscore", "--models-root", str(models_root), "--num-workers", "0",
                 "--n-boot", "100", "--out", str(tmp_path / "bench")]) == 0
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "6 paired images" in report and "same seeds on both sides" in report
    assert (tmp_path / "bench" / "scores_A" / "scores.parquet").is_file()


# ------------------------------------------------------------------------------------------- GenEval + import
def test_geneval_export_and_summary(tiny_sd, tmp_path, capsys):
    from diffusion_po.eval.geneval import export_geneval, summarize_geneval

    run = generate_images(GenerateConfig(model=tiny_sd, prompts="geneval", n=2, steps=1, limit=2), tmp_path / "g",
                          progress=False)
    assert export_geneval(run, tmp_path / "geneval") == 4
    meta = json.loads((tmp_path / "geneval" / "00001" / "metadata.jsonl").read_text())
    assert meta["prompt"] == "a photo of a cow" and meta["tag"] == "single_object"
    assert sorted(p.name for p in (tmp_path / "geneval" / "00000" / "samples").iterdir()) == ["00000.png", "00001.png"]

    results = tmp_path / "results.jsonl"
    rows = []
    truth = {"single_object": [1, 1, 1, 0], "counting": [0, 0, 1, 0], "colors": [1, 0]}
    for tag, vals in truth.items():
        for j, c in enumerate(vals):
            rows.append({"tag": tag, "correct": bool(c), "metadata": json.dumps({"tag": tag, "p": j // 2})})
    append_jsonl(results, rows)
    s = summarize_geneval(results)
    assert s["overall"] == pytest.approx(np.mean([0.75, 0.25, 0.5]))
    assert s["n_images"] == 10 and s["n_prompts"] == 5
    assert s["correct_prompts"] == pytest.approx(4 / 5)  # a prompt counts if any of its images is correct
    assert main(["eval", "geneval-summary", str(results)]) == 0
    assert "Overall score (avg. over tasks): 0.50000" in capsys.readouterr().out


def test_import_hps_layout(tmp_path):
    from diffusion_po.eval.importer import import_folder
    from diffusion_po.eval.prompts import load_hpsv2

    bench = tmp_path / "bench"
    bench.mkdir()
    for style in ("anime", "concept-art", "paintings", "photo"):
        (bench / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(3)]))
        (tmp_path / "imgs" / style).mkdir(parents=True)
        for i in range(3 if style != "photo" else 2):
            Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / style / f"{i:05d}.jpg")
    path, n, missing = import_folder(tmp_path / "imgs", load_hpsv2(bench), "hps")
    assert n == 11 and missing == 1
    rows = read_manifest(path.parent, require_images=True)
    photo = [r for r in rows if r["category"] == "photo"]
    assert photo[1]["prompt"] == "photo prompt 1" and photo[1]["prompt_id"] == "photo/00001"
    with pytest.raises(DataError, match="exists already"):
        import_folder(tmp_path / "imgs", load_hpsv2(bench), "hps")


def test_cli_errors_are_user_errors(tmp_path, capsys):
    assert main(["eval", "score", "--images", str(tmp_path), "--metrics", "fid"]) == 2
    assert "unknown metric 'fid'" in capsys.readouterr().err
    assert main(["eval", "score", "--images", str(tmp_path), "--metrics", "pickscore",
                 "--models-root", str(tmp_path)]) == 2
    assert "prefetch" in capsys.readouterr().err
    assert main(["eval", "prefetch", "--models-root", str(tmp_path / "m"), "--metrics", "hps_v2", "--dry-run"]) == 0
    assert "HPSv2/HPS_v2_compressed.pt" in capsys.readouterr().out


def test_hps_export_roundtrip(tiny_sd, tmp_path):
    from diffusion_po.eval.importer import export_hps, import_folder
    from diffusion_po.eval.prompts import load_hpsv2

    bench = tmp_path / "bench"
    bench.mkdir()
    for style in ("anime", "concept-art", "paintings", "photo"):
        (bench / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(2)]))
    run = generate_images(GenerateConfig(model=tiny_sd, prompts=f"hpsv2:{bench}", n=2, steps=1), tmp_path / "run",
                          progress=False)
    assert export_hps(run, tmp_path / "hps") == 8
    assert sorted(p.name for p in (tmp_path / "hps" / "photo").iterdir()) == ["00000.jpg", "00001.jpg"]
    _, n, missing = import_folder(tmp_path / "hps", load_hpsv2(bench), "hps")
    assert (n, missing) == (8, 0)


def test_parity_command(models_root, tmp_path, capsys):
    from diffusion_po.eval.parity import DEMO_PROMPT

    img = tmp_path / "demo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(img)
    (pick,) = _scorers(models_root, ("pickscore",))
    ours = pick.score([Image.open(img).convert("RGB")], DEMO_PROMPT)[0]
    base = ["eval", "parity", "--image", str(img), "--metrics", "pickscore", "--models-root", str(models_root)]
    (tmp_path / "good.json").write_text(json.dumps({"pickscore": ours + 0.01}))
    assert main([*base, "--official", str(tmp_path / "good.json"), "--out", str(tmp_path / "r.json")]) == 0
    assert "OK  pickscore" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["prompts"] == [DEMO_PROMPT] and result["ok"]
    (tmp_path / "bad.json").write_text(json.dumps({"pickscore": [ours + 1.0]}))
    assert main([*base, "--official", str(tmp_path / "bad.json")]) == 1
    assert "BAD pickscore" in capsys.readouterr().out


def test_generation_through_the_guided_sampler(tiny_sd, prompt_file, tmp_path):
    """--guidance routes through diffusion_po.sampling with the same per-image seeds."""
    stock = generate_images(GenerateConfig(model=tiny_sd, prompts=prompt_file, n=1, steps=2, guidance_scale=5.0,
                                           limit=2), tmp_path / "stock", progress=False)
    guided = generate_images(GenerateConfig(model=tiny_sd, prompts=prompt_file, n=1, steps=2, guidance_scale=5.0,
                                            limit=2, guidance="cfg"), tmp_path / "guided", progress=False)
    perp = generate_images(GenerateConfig(model=tiny_sd, prompts=prompt_file, n=1, steps=2, guidance_scale=5.0,
                                          limit=2, guidance="perp-neg", negative_prompt="blurry"),
                           tmp_path / "perp", progress=False)
    rows_s, rows_g, rows_p = (sorted(read_manifest(r), key=lambda r: r["image"]) for r in (stock, guided, perp))
    assert [r["seed"] for r in rows_g] == [r["seed"] for r in rows_s] == [r["seed"] for r in rows_p]
    assert rows_g[0]["engine"] == "diffusion_po.sampling" and rows_p[0]["guidance"] == "perp-neg"
    for rs, rg in zip(rows_s, rows_g):  # plain CFG through the sampler reproduces the stock pipeline
        assert np.abs(_load(rs["_path"]) - _load(rg["_path"])).max() <= 2


def _tiny_lora(model: str, folder: Path) -> Path:
    """A LoRA as the trainer saves it (rank 4, lora_alpha 16, non-zero B)."""
    from peft import LoraConfig

    from diffusion_po.families import load_family

    fam = load_family(model)
    torch.manual_seed(0)
    fam.network.add_adapter(LoraConfig(r=4, lora_alpha=16, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in fam.network.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    fam.save_lora(folder)
    return folder


def test_readme_evaluate_command_with_a_lora(tiny_sd, models_root, tmp_path, capsys):
    """README's Evaluate command shape: `eval benchmark --model M --lora DIR --prompts parti --metrics ...`
    (the baseline is the model without the LoRA); `eval generate --lora` as well."""
    lora = _tiny_lora(tiny_sd, tmp_path / "sd15_dpo_lora")
    ck = ["--checkpoint", tiny_checkpoint_options(models_root)[0]]
    out = tmp_path / "bench" / "dpo-vs-base"
    assert main(["eval", "benchmark", "--model", tiny_sd, "--lora", str(lora), "--prompts", "parti",
                 "--metrics", "pickscore,hps_v2.1", "--out", str(out), "--models-root", str(models_root), *ck,
                 "--limit", "2", "--steps", "2", "--n-boot", "50", "--num-workers", "0"]) == 0
    assert (out / "report.md").is_file()
    a, b = read_manifest(out / "A"), read_manifest(out / "B")
    assert [r["seed"] for r in a] == [r["seed"] for r in b]
    assert any(np.abs(_load(ra["_path"]) - _load(rb["_path"])).max() > 0 for ra, rb in zip(a, b))  # LoRA applied
    assert main(["eval", "generate", "--model", tiny_sd, "--lora", str(lora), "--prompts", "parti", "--limit", "2",
                 "--steps", "2", "--out", str(tmp_path / "gen")]) == 0
    for ra, rg in zip(a, read_manifest(tmp_path / "gen")):
        assert np.array_equal(_load(ra["_path"]), _load(rg["_path"]))


def test_sample_output_scores_and_shares_flags_and_seeds_with_eval(tiny_sd, models_root, tmp_path):
    """`eval score --images` reads `diffusion-po sample`'s folder (manifest `file` key); both verbs take
    --out/--output-dir, -n, --batch-size and the same scheduler names, and give image k of prompt i one seed."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    common = ["--model", tiny_sd, "--steps", "2", "-n", "2", "--seed", "4", "--batch-size", "3", "--scheduler", "ddim"]
    assert main(["sample", *common, "--prompts", str(prompts), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert main(["eval", "generate", *common, "--prompts", str(prompts), "--output-dir", str(tmp_path / "g")]) == 0
    seeds = {}
    for run in ("s", "g"):
        rows = read_manifest(tmp_path / run, require_images=True)
        seeds[run] = sorted((int(r["prompt_index"]), int(r["k"]), int(r["seed"])) for r in rows)
        assert all(r["scheduler"] == "DDIMScheduler" for r in rows)
    assert seeds["s"] == seeds["g"] == [(i, k, seed_for(4, i, 2, k)) for i in range(2) for k in range(2)]
    ck = ["--checkpoint", tiny_checkpoint_options(models_root)[0]]
    assert main(["eval", "score", "--images", str(tmp_path / "s"), "--metrics", "pickscore,hps_v2.1",
                 "--models-root", str(models_root), *ck, "--num-workers", "0"]) == 0
    rows, _ = load_score_table(tmp_path / "s")
    assert len(rows) == 4 and all(np.isfinite(r["pickscore"]) for r in rows)


def test_eval_generate_true_cfg_on_flux_dev(tmp_path, tiny_model_factory, capsys):
    """`eval generate` takes `sample`'s --true-cfg / --embedded-guidance: FLUX.1-dev CFG through the sampler, the
    same image as `sampling.generate` with those settings; without --true-cfg the one-line error says to set it."""
    from diffusion_po.families import load_family
    from diffusion_po.sampling import generate

    model = tiny_model_factory("flux")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    base = ["eval", "generate", "--model", model, "--prompts", str(prompts), "--steps", "1", "--height", "32",
            "--width", "32", "--guidance", "cfg", "--guidance-scale", "3", "--gen-dtype", "fp32", "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "plain")]) == 2
    assert "--true-cfg" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "run"), "--true-cfg", "--embedded-guidance", "2.5"]) == 0
    (row,) = read_jsonl(tmp_path / "run" / "manifest.jsonl")
    assert row["engine"] == "diffusion_po.sampling" and row["true_cfg"] and row["embedded_guidance"] == 2.5
    family = load_family(model, options={"guidance_scale": 2.5})
    (want,) = generate(family, ["a red circle"], seeds=[seed_for(0, 0, 1, 0)], scale=3.0, steps=1, height=32,
                       width=32, true_cfg=True)
    got = Image.open(tmp_path / "run" / row["image"])
    assert np.array_equal(np.asarray(got), np.asarray(want))
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert run_info["true_cfg"] is True and run_info["embedded_guidance"] == 2.5


def test_eval_embedded_guidance_needs_a_guidance_distilled_model(tmp_path, tiny_sd, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["eval", "generate", "--model", tiny_sd, "--prompts", str(prompts), "--steps", "1", "--out",
                 str(tmp_path / "run"), "--embedded-guidance", "2.5", "--device", "cpu"]) == 2
    assert "--embedded-guidance applies to guidance-distilled FLUX.1-dev" in capsys.readouterr().err


def test_a_run_without_the_flux_settings_keeps_its_identity():
    """run.json written before --true-cfg/--embedded-guidance existed still resumes: unset, they are not in it."""
    identity = GenerateConfig(model="m", prompts="p").identity()
    assert "true_cfg" not in identity and "embedded_guidance" not in identity
    assert GenerateConfig(model="m", prompts="p", true_cfg=True).identity()["true_cfg"] is True
