"""`diffusion-po toy compare`: the leaderboard's aggregation (pooled over seeds, grouped by prompt), the equal
compute budget, resuming, and an end-to-end run on a tiny compositional base."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from diffusion_po.errors import UserError
from diffusion_po.toy import compare

# --- aggregation on hand-made run folders


def _item(prompt: str, outcome: float) -> dict:
    """A test item whose tuned-vs-base outcome is `outcome` (1 win, 0.5 tie, 0 loss); the accuracy gain
    (share of the caption's parts right) is outcome - 0.5 and the reward gain 0.2 (outcome - 0.5)."""
    def result(reward: float, right: int) -> dict:
        return {"caption": prompt, "reward": reward, "correct": right == 2, "share_ok": right / 2,
                "parts": {"count": reward, "colour": reward}, "ok": {"count": right >= 1, "colour": right == 2}}

    tuned_right = {1.0: 2, 0.5: 1, 0.0: 0}[outcome]
    return {"prompt": prompt, "seed": 0, "base": result(0.5, 1), "tuned": result(0.5 + 0.2 * (outcome - 0.5),
                                                                                  tuned_right)}


def _write_run(folder: Path, items: list[dict], win_rate: float, chosen_step: int = 10) -> None:
    folder.mkdir(parents=True)
    (folder / "test_scores.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    gains = {"reward_gain": {"value": 0.2 * (win_rate - 0.5)}, "accuracy_gain": {"value": win_rate - 0.5}}
    (folder / "results.json").write_text(json.dumps({"win_rate": {"win_rate": win_rate}, **gains,
                                                     "chosen_step": chosen_step, "timings_s": {"total": 30.0}}))


@pytest.fixture
def hand_made(tmp_path) -> compare.CompareConfig:
    """dpo over seeds 0 and 1 on captions A and B (4 images each per seed), kto all wins, mapo only seed 0."""
    outcomes = {0: {"A": [1, 1, 1, 1], "B": [0, 0, 0, 0]}, 1: {"A": [1, 1, 1, 0], "B": [1, 1, 0, 0.5]}}
    for seed, by_prompt in outcomes.items():
        items = [_item(p, o) for p, os_ in by_prompt.items() for o in os_]
        _write_run(tmp_path / str(seed) / "dpo", items, sum(o for os_ in by_prompt.values() for o in os_) / 8)
        _write_run(tmp_path / str(seed) / "kto", [_item(p, 1.0) for p in "AB" for _ in range(4)], 1.0)
    _write_run(tmp_path / "0" / "mapo", [_item("A", 1.0), _item("B", 0.5)], 0.75)
    return compare.CompareConfig(out=str(tmp_path), methods=("dpo", "mapo", "kto"), seeds=(0, 1), n_pairs=8,
                                 train_steps=2, checkpoints=1)


def test_leaderboard_pools_seeds_groups_by_prompt_and_sorts_by_win_rate(hand_made):
    rows = compare.aggregate(hand_made)
    # pooled win rates 1.0, 0.75 and 0.75; the tie goes to the larger reward gain (mapo's 0.05 > dpo's 0.019)
    assert [r["method"] for r in rows] == ["kto", "mapo", "dpo"]
    dpo = rows[2]
    # the unit is a (seed, caption): its 4 images' mean reward against the base's. Seed 0: A's mean outcome 1
    # (a win), B's 0 (a loss); seed 1: A's 0.75 and B's 0.625 (tuned reward 0.55 and 0.525 > 0.5: two wins)
    assert dpo["seeds"] == [0, 1] and dpo["n_items"] == 4 and dpo["n_prompts"] == 2
    wr = dpo["win_rate"]
    assert wr["win_rate"] == pytest.approx(3 / 4) and (wr["wins"], wr["ties"], wr["losses"]) == (3, 0, 1)
    # the bootstrap resamples the 2 captions (each draw is both A or both B with probability 1/4): the 95%
    # interval runs from B's mean (a loss and a win) to A's (two wins)
    assert (wr["lo"], wr["hi"]) == pytest.approx((0.5, 1.0))
    # accuracy gain per unit: its items' mean of outcome - 0.5 (0.5, -0.5, 0.25, 0.125); reward gain 0.2 x that
    acc, gain = dpo["accuracy_gain"], dpo["reward_gain"]
    assert (acc["value"], acc["lo"], acc["hi"]) == pytest.approx((0.375 / 4, -0.375 / 2, 0.75 / 2))
    assert (gain["value"], gain["lo"], gain["hi"]) == pytest.approx((0.2 * 0.375 / 4, -0.2 * 0.375 / 2,
                                                                       0.2 * 0.75 / 2))
    # the spread over seeds: mean and sample sd of the per-seed win rates 4/8 and 5.5/8 (their results.json)
    assert dpo["spread"]["win_rate"]["mean"] == pytest.approx(9.5 / 16)
    assert dpo["spread"]["win_rate"]["sd"] == pytest.approx((1.5 / 8) / 2 ** 0.5)
    assert dpo["spread"]["accuracy_gain"]["sd"] == pytest.approx((1.5 / 8) / 2 ** 0.5)
    mapo = rows[1]
    assert mapo["seeds"] == [0] and mapo["spread"]["win_rate"] == {"mean": 0.75, "sd": None}
    assert rows[0]["win_rate"]["lo"] == rows[0]["win_rate"]["hi"] == 1.0


def test_leaderboard_files(hand_made):
    compare.write_leaderboard(hand_made, compare.aggregate(hand_made))
    out = Path(hand_made.out)
    table = [line for line in (out / "leaderboard.md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[1] for row in table[1:]] == ["kto", "mapo", "dpo"]
    assert "| 3 | dpo | 0,1 | **0.750 [0.500, 1.000]** | 0.594 ± 0.133 |" in table[3]  # pooled; per seed: results.json
    assert "| 0.750 ± – |" in table[2] and table[3].endswith("| 10, 10 | 30 |")
    saved = json.loads((out / "leaderboard.json").read_text())
    assert [r["method"] for r in saved["methods"]] == ["kto", "mapo", "dpo"]
    assert saved["protocol"]["train_steps"] == 2 and saved["protocol"]["n_pairs"] == 8
    assert (out / "leaderboard.png").stat().st_size > 1000


# --- the budget


def test_every_method_gets_the_same_steps_and_generated_images(tmp_path):
    """Offline: 2 images per pair; online: rounds x prompts per round x K = 2 x pairs; the same
    max_train_steps and checkpoints for all; the seed sets the pairs and the trainer."""
    from diffusion_po.toy.experiment import trainer_config
    from diffusion_po.toy.methods import ONLINE, method_run

    cfg = compare.CompareConfig(out=str(tmp_path), n_pairs=1000, train_steps=100, checkpoints=4)
    assert set(compare.COMPARE_METHODS) >= {"dpo", "npo", "self_npo", "dcpo", "dro", "kto", "mapo", "sft",
                                            "robust_dpo", "curated", "online_dpo"}
    for method in compare.COMPARE_METHODS:
        run = method_run(method, compare.run_config(cfg, 2, method))
        assert run.pair_seed == 2 and run.n_pairs == 1000
        tc = trainer_config(run, tmp_path, tmp_path / "data", tmp_path / "train")
        assert (tc.method, tc.max_train_steps, tc.checkpointing_steps, tc.seed) == (method, 100, 25, 2)
        spent = compare.budget(cfg, method)
        if method in ONLINE:
            o = tc.method_options
            prompts_per_round = o["steps_per_round"] * tc.train_batch_size
            assert o["rounds"] * prompts_per_round * o["samples_per_prompt"] == 4 * 1000 == spent.generated_images
            assert o["rounds"] * o["steps_per_round"] == tc.max_train_steps and o["rounds"] == 4
            assert o["reward"]["name"] == "toy_compositional"
            assert (o["sampler_steps"], o["guidance_scale"]) == (run.steps, run.scale)
        else:
            assert spent.generated_images == (0 if method == "self_npo" else 4000)  # best and worst of 4 per pair
    assert compare.budget(cfg, "curated").online["train_batch_size"] == 10  # 4000 / (100 x K 4)
    assert compare.budget(cfg, "online_dpo").online["train_batch_size"] == 20  # 4000 / (100 x K 2)
    two_per_pair = dataclasses.replace(cfg, run_defaults={"pair_samples": 2})  # the pair's two samples only
    assert compare.budget(two_per_pair, "dpo").generated_images == 2000
    assert compare.budget(two_per_pair, "online_dpo").online["train_batch_size"] == 10  # 2000 / (100 x 2)
    assert compare.run_config(two_per_pair, 0, "dpo").pair_samples == 2


def test_sizes_that_cannot_be_met_exactly_are_refused():
    with pytest.raises(UserError, match=r"multiple of --steps x K = 1200; use e\.g\. --pairs 1200"):
        compare.budget(compare.CompareConfig(n_pairs=999, train_steps=300, checkpoints=5), "curated")
    with pytest.raises(UserError, match="multiple of --checkpoints 7"):
        compare.budget(compare.CompareConfig(train_steps=250, checkpoints=7), "dpo")


def test_bad_methods_and_seeds_are_one_line_errors(tmp_path, capsys):
    from diffusion_po.cli import main

    out = str(tmp_path / "c")
    for flags, expected in ((["--methods", "dpo,ipo"], "unknown method 'ipo'"), (["--methods", ","], "no method"),
                            (["--methods", "dpo,dpo"], "names a method twice"),
                            (["--seeds", "0,x"], "--seeds '0,x': give comma-separated integers"),
                            (["--seeds", "1,1"], "distinct and non-negative"),
                            (["--pairs", "999"], "use e.g. --pairs 1000"), (["--steps", "0"], "--steps must be positive")):
        assert main(["toy", "compare", "--out", out, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not Path(out).exists()  # refused before any work


# --- end to end at tiny size


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from diffusion_po.toy import build
    from diffusion_po.toy.build import BuildConfig

    out = tmp_path_factory.mktemp("toy_compositional") / "base"
    build.build_base(out, dataclasses.replace(BuildConfig.small(), world="compositional", caption_split="train",
                                              lr_schedule="constant"))
    return out


TINY = ["--pairs", "4", "--val", "2", "--test", "3", "--steps", "2", "--checkpoints", "1", "--threads", "1",
        "--set", "train_batch_size=2", "--set", "lr_warmup_steps=0"]


def _compare(base: Path, out: Path, *extra: str) -> int:
    from diffusion_po.cli import main

    return main(["toy", "compare", "--out", str(out), "--model", str(base), "--methods", "dpo,online_dpo",
                 "--seeds", "0,1", *TINY, *extra])


@pytest.fixture(scope="module")
def finished(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "run"
    assert _compare(tiny_base, out) == 0
    return out


def test_compare_runs_every_method_and_seed_through_the_cli(finished):
    rows = json.loads((finished / "leaderboard.json").read_text())["methods"]
    assert sorted(r["method"] for r in rows) == ["dpo", "online_dpo"]
    assert all(r["seeds"] == [0, 1] and r["n_items"] == 6 for r in rows)
    assert (finished / "leaderboard.md").is_file() and (finished / "leaderboard.png").is_file()
    for seed in (0, 1):
        assert (finished / str(seed) / "pairs.parquet").is_file()
        dpo = json.loads((finished / str(seed) / "dpo" / "results.json").read_text())
        assert dpo["data"]["pairs"] == {"reused": str(finished / str(seed) / "pairs.parquet")}  # sampled once
        online = json.loads((finished / str(seed) / "online_dpo" / "results.json").read_text())
        tc = online["train_config"]
        assert tc["max_train_steps"] == dpo["train_config"]["max_train_steps"] == 2
        # the online method generates as many images as the pairs: pairs x 4 (the best and worst of 4 each)
        assert tc["train_batch_size"] * tc["method_options"]["samples_per_prompt"] * 2 == 2 * 4 * 2
        assert f"seed={seed}" in online["run"]["overrides"] and dpo["run"]["pair_seed"] == seed
    assert len(list((finished / "cache").glob("base-*.json"))) == 2  # the base's val and test, once for all runs


def test_compare_resumes_where_it_stopped(finished, tiny_base, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(finished, out)
    results = sorted(out.glob("*/*/results.json"))
    stamps = {p: p.stat().st_mtime_ns for p in results}
    capsys.readouterr()
    assert _compare(tiny_base, out) == 0  # everything finished: nothing is recomputed
    assert "toy compare: run" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in results} == stamps
    unfinished = out / "1" / "online_dpo" / "results.json"
    unfinished.unlink()  # as if interrupted during that run
    assert _compare(tiny_base, out) == 0
    ran = [line for line in capsys.readouterr().out.splitlines() if line.startswith("toy compare: ")]
    assert ran == ["toy compare: run seed 1 online_dpo"] and unfinished.is_file()
    assert {p: p.stat().st_mtime_ns for p in results if p != unfinished} == {
        p: t for p, t in stamps.items() if p != unfinished}
    assert _compare(tiny_base, out, "--val", "3") == 2  # another protocol in the same folder is refused
    assert "holds a compare with other settings (n_val: 2)" in capsys.readouterr().err


def test_toy_method_runs_curated_on_the_train_prompts_with_the_world_oracle(tiny_base, tmp_path):
    from diffusion_po.cli import main

    out = tmp_path / "curated"
    assert main(["toy", "method", "curated", "--out", str(out), "--model", str(tiny_base), "--val", "2",
                 "--test", "2", "--threads", "1", "--set", "max_train_steps=2", "--set", "checkpointing_steps=1",
                 "--set", "train_batch_size=1", "--set", "method_options.rounds=2",
                 "--set", "method_options.steps_per_round=1"]) == 0
    res = json.loads((out / "results.json").read_text())
    options = res["train_config"]["method_options"]
    assert res["method"] == "curated" and options["reward"]["name"] == "toy_compositional"
    assert [row["step"] for row in res["val_curve"]] == [0, 1, 2] and res["win_rate"]["n"] == 2
    from diffusion_po.toy.worlds import get_world

    assert (out / "prompts.txt").read_text().split("\n")[:-1] == get_world("compositional").split_captions("train")
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics if "round" in m] == [1, 2]  # one round per step, as set


@pytest.mark.slow  # worker processes start in ~15 s
def test_jobs_run_in_worker_processes_with_the_same_results(finished, tiny_base, tmp_path):
    """--jobs 2: pairs sampled in worker processes equal the ones sampled in this process, and a run on pairs
    waits for its seed's pairs."""
    import pyarrow.parquet as pq

    cfg = compare.CompareConfig(out=str(tmp_path), model=str(tiny_base), methods=("dpo",), seeds=(0, 1), n_pairs=4,
                                n_val=2, n_test=3, train_steps=2, checkpoints=1, threads=1, jobs=2,
                                overrides=["train_batch_size=2", "lr_warmup_steps=0"])
    compare._run_tasks(cfg, [("pairs", 0, ""), ("run", 0, "dpo"), ("pairs", 1, "")])
    for seed in (0, 1):
        assert pq.read_table(tmp_path / str(seed) / "pairs.parquet").equals(
            pq.read_table(finished / str(seed) / "pairs.parquet"))
        assert "toy pairs: sampling" in (tmp_path / str(seed) / "pairs.log").read_text()  # each worker's output
    assert compare.is_finished(tmp_path / "0" / "dpo") and "validation" in (tmp_path / "0" / "dpo.log").read_text()
