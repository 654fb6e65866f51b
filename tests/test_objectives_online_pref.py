"""Online preference learning (`curated`, `online_dpo`): the Bradley-Terry choice and the real-data share
against hand computations, round bookkeeping (prompts sampled, K samples, lambda mixing, round snapshots),
online DPO's log 2 start and refreshed reference, and exact resume in the middle of a round."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusion_po.cli import main
from diffusion_po.eval.scorers.base import Scorer
from diffusion_po.objectives.curated import bradley_terry_choice, real_rows
from diffusion_po.objectives.online_dpo import best_and_worst
from tests.helpers import RGB

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
REWARD = "tests.test_objectives_online_pref:RednessReward"


class RednessReward(Scorer):
    """A cheap deterministic reward: mean red minus mean green/blue of the image, in [-1, 1]. Records the
    prompts it scored (for the bookkeeping tests)."""

    name = "redness"
    metrics = ("redness",)
    calls: list[list[str]] = []

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return lambda im: torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        RednessReward.calls.append(list(prompts))
        r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
        return {"redness": (r - 0.5 * (g + b)).mean(dim=(1, 2)).double()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onlinedata")
    rows = []
    for i, (name, rgb) in enumerate(list(RGB.items()) * 2):
        arr = np.clip(np.array(rgb)[None, None] + np.random.default_rng(i).normal(0, 15, (32, 32, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(root / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": f"a {name} square number {i}"})
    (root / "images.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "prompts.txt").write_text("\n".join(f"a {c} square" for c in RGB) + "\n")
    return {"images": root / "images.jsonl", "prompts": root / "prompts.txt"}


def write_config(folder: Path, model: str, method: str, data_file: Path, fmt: str, options: dict, **top) -> Path:
    cfg = {
        "method": method, "pretrained_model_name_or_path": model, "output_dir": str(folder / "out"),
        "resolution": 32, "train_batch_size": 2, "max_train_steps": 2, "learning_rate": 1e-3,
        "checkpointing_steps": 1000, "report_to": "none", "use_lora": True, "rank": 4,
        "data": {"format": fmt, "data_files": [str(data_file)]},
        "method_options": {"sampler_steps": 2, "samples_per_prompt": 2, "reward": {"name": REWARD}, **options},
        **top,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics_rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "out" / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- pure pieces


def test_bradley_terry_choice_matches_hand_computation():
    rewards = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    temperature = 0.5
    for row, u in [(0, 0.05), (0, 0.3), (0, 0.95), (1, 0.01), (1, 0.999)]:
        weights = [math.exp(r / temperature) for r in rewards[row].tolist()]
        cdf, acc = [], 0.0
        for w in weights:
            acc += w / sum(weights)
            cdf.append(acc)
        expected = next(k for k, c in enumerate(cdf) if u < c)
        got = bradley_terry_choice(rewards[row : row + 1], temperature, torch.tensor([u]))
        assert got.tolist() == [expected], (row, u, cdf)
    # temperature 0: the argmax, the first one on ties
    assert bradley_terry_choice(torch.tensor([[1.0, 3.0, 3.0], [2.0, 1.0, 0.0]]), 0.0).tolist() == [1, 0]
    # the empirical frequencies follow softmax(r / T)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    picks = bradley_terry_choice(rewards[:1].expand(20000, 3), temperature, u)
    freq = torch.bincount(picks, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(rewards[0] / temperature, 0), atol=0.01, rtol=0)


def test_real_rows_share_is_lambda():
    assert [real_rows(0.5, 2 * i, 2) for i in range(4)] == [1, 1, 1, 1]
    assert [real_rows(0.25, 2 * i, 2) for i in range(4)] == [0, 1, 0, 1]
    assert [real_rows(0.3, 3 * i, 3) for i in range(10)].count(1) == 9  # floor(0.3 * 30) = 9 rows in all
    assert real_rows(0.0, 5, 4) == 0 and real_rows(1.0, 5, 4) == 4
    assert sum(real_rows(0.1, i, 1) for i in range(30)) == 3


def test_best_and_worst_pairs():
    win, lose = best_and_worst(torch.tensor([[0.1, 0.9, 0.4], [2.0, 2.0, 2.0], [0.0, -1.0, 5.0]]))
    assert win.tolist() == [1, 0, 2] and lose.tolist() == [0, 2, 1]


def test_options_are_checked(tiny_sd, data):
    from diffusion_po.config import load_train_config
    from diffusion_po.errors import ConfigError

    base = [f"pretrained_model_name_or_path={tiny_sd}", f"data.data_files=[{data['prompts']}]", "data.format=prompts"]
    with pytest.raises(ConfigError, match="real_data_fraction"):
        from diffusion_po.objectives import get_method_class

        cfg = load_train_config(None, [*base, "method=curated", "method_options.real_data_fraction=0.5"])
        get_method_class("curated")(cfg)
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        load_train_config(None, [*base, "method=online_dpo", "method_options.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="reference"):
        load_train_config(None, [*base, "method=online_dpo", "method_options.reference=sometimes"])
    with pytest.raises(ConfigError, match="rounds x steps_per_round"):
        cfg = load_train_config(None, [*base, "method=curated", "method_options.rounds=3", "max_train_steps=10"])
        get_method_class("curated")(cfg)


# ----------------------------------------------------------------------------- through the trainer


def test_curated_round_bookkeeping(tmp_path, tiny_sd, data):
    """lambda 0.5 with batches of 2: one real row per batch, the other row's caption sampled K = 3 times and
    scored; rounds of 2 steps; the metrics report the round, the real share and the rewards."""
    RednessReward.calls.clear()
    cfg = write_config(tmp_path, tiny_sd, "curated", data["images"], "images",
                       {"samples_per_prompt": 3, "real_data_fraction": 0.5, "steps_per_round": 2,
                        "temperature": 0.1}, max_train_steps=4)
    assert main(["train", str(cfg)]) == 0
    rows = metrics_rows(tmp_path)
    assert [r["round"] for r in rows] == [1, 1, 2, 2]
    assert all(r["real_fraction"] == 0.5 for r in rows)
    assert len(RednessReward.calls) == 4
    from diffusion_po.config import load_train_config
    from diffusion_po.data import build_train_data

    train_cfg = load_train_config(cfg)
    loader = iter(build_train_data(train_cfg.data, 32, 2, 0, 1, train_cfg.seed).loader)
    for call in RednessReward.calls:  # K = 3 samples of the batch's second caption (the first row is real)
        captions = next(loader)["captions"]
        assert call == [captions[1]] * 3
    # round/reward_mean is the running mean of the round: at its second step, the mean of both steps
    for first, second in [(rows[0], rows[1]), (rows[2], rows[3])]:
        assert first["round/reward_mean"] == pytest.approx(first["reward_mean"], rel=1e-6)
        assert second["round/reward_mean"] == pytest.approx(0.5 * (first["reward_mean"] + second["reward_mean"]),
                                                            rel=1e-5)
        assert first["reward_kept"] <= first["reward_max"] + 1e-9


def test_curated_prompts_keeps_the_best(tmp_path, tiny_sd, data):
    """data.format prompts, temperature 0: every prompt of the batch is sampled K times and the kept reward is
    the best of the K."""
    RednessReward.calls.clear()
    cfg = write_config(tmp_path, tiny_sd, "curated", data["prompts"], "prompts", {"samples_per_prompt": 2})
    assert main(["train", str(cfg)]) == 0
    rows = metrics_rows(tmp_path)
    assert len(rows) == 2 and all(r["real_fraction"] == 0 for r in rows)
    for r in rows:
        assert r["reward_kept"] == pytest.approx(r["reward_max"], rel=1e-6)
    assert [len(c) for c in RednessReward.calls] == [4, 4]  # 2 prompts x K = 2, prompt-major
    assert RednessReward.calls[0][0] == RednessReward.calls[0][1] != RednessReward.calls[0][2]


@pytest.mark.parametrize("reference", ["fixed", "refresh"])
def test_online_dpo_starts_at_log2_and_refresh(tmp_path, tiny_sd, data, reference):
    """Step 1 is log 2 with either reference; with `refresh` (one step per round) every round starts at log 2
    again, with `fixed` the policy has moved away from the base by step 3."""
    cfg = write_config(tmp_path, tiny_sd, "online_dpo", data["prompts"], "prompts",
                       {"reference": reference, "steps_per_round": 1, "beta_dpo": 5e6}, max_train_steps=3,
                       learning_rate=0.05)
    assert main(["train", str(cfg)]) == 0
    rows = metrics_rows(tmp_path)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    if reference == "refresh":
        assert all(r["loss"] == pytest.approx(math.log(2), abs=1e-6) for r in rows)
        assert [r["round"] for r in rows] == [1, 2, 3]
    else:
        assert abs(rows[2]["loss"] - math.log(2)) > 1e-4


def test_refreshed_snapshot_is_the_policy_at_round_start(tiny_sd, data):
    from diffusion_po.config import load_train_config
    from diffusion_po.training.trainer import Trainer

    cfg = load_train_config(None, [f"pretrained_model_name_or_path={tiny_sd}", "method=online_dpo",
                                   "data.format=prompts", f"data.data_files=[{data['prompts']}]", "use_lora=true",
                                   "rank=4", f"method_options.reward.name={REWARD}", "method_options.steps_per_round=2",
                                   "method_options.reference=refresh", "report_to=none"])
    trainer = Trainer(cfg)
    method, ctx = trainer.method, trainer.context
    assert method.needs_reference is False and trainer.reference is None
    policy = ctx.trainable_network
    lora = [n for n, p in policy.named_parameters() if p.requires_grad]

    def moved() -> None:
        with torch.no_grad():
            for p in policy.parameters():
                if p.requires_grad:
                    p.add_(0.01)

    snap = lambda: dict(method.snapshot.named_parameters())  # noqa: E731
    assert method.start_micro_step(ctx) is True  # round 1 starts: the snapshot is the policy
    method.micro_step += 1
    moved()
    assert method.start_micro_step(ctx) is False  # mid-round: the snapshot stays the round-start policy
    assert not torch.equal(snap()[lora[0]], dict(policy.named_parameters())[lora[0]])
    method.micro_step += 1
    moved()
    assert method.start_micro_step(ctx) is True  # round 2: the snapshot takes the current policy
    params = dict(policy.named_parameters())
    for n in lora:
        assert torch.equal(snap()[n], params[n])


@pytest.mark.parametrize("method,fmt,options", [
    ("curated", "images", {"real_data_fraction": 0.5, "temperature": 0.05, "steps_per_round": 2}),
    ("online_dpo", "prompts", {"reference": "refresh", "steps_per_round": 2}),
])
def test_resume_in_the_middle_of_a_round(tmp_path, tiny_sd, data, method, fmt, options):
    """4 steps straight equal 3 steps, a kill, and a resume from checkpoint-3: inside round 2 (steps 3-4), whose
    sampling snapshot (and refreshed reference) is the policy after step 2, not the one the resume starts from."""
    common = dict(max_train_steps=4, checkpointing_steps=3)
    full = write_config(tmp_path / "full", tiny_sd, method, data[fmt], fmt, options, **common)
    assert main(["train", str(full)]) == 0
    split = write_config(tmp_path / "split", tiny_sd, method, data[fmt], fmt, options, **common)
    env = dict(os.environ, DIFFUSION_PO_DIE_AFTER_STEP="3",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "diffusion_po.cli", "train", str(split)], env=env, cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert main(["train", str(split), "--resume"]) == 0
    a, b = metrics_rows(tmp_path / "full"), metrics_rows(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3, 4] and [r["round"] for r in b] == [1, 1, 2, 2]
    for ra, rb in zip(a, b):
        for key in ("loss", "reward_mean", "round/reward_mean"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), key
    from safetensors.torch import load_file

    wa, wb = (load_file(tmp_path / run / "out" / "pytorch_lora_weights.safetensors") for run in ("full", "split"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["toy_curated", "toy_online_dpo"])
def test_shipped_toy_configs_train_with_the_toy_oracle(tmp_path, tiny_sd, name):
    """The shipped configs run (one round of one step, on the tiny model) with the toy oracle as reward, by
    registry name; its reward lands in the metrics."""
    from diffusion_po.shipped import config_path
    from diffusion_po.toy import world

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(world.train_prompts(4)) + "\n")
    args = ["train", str(config_path(name)), "--set", f"pretrained_model_name_or_path={tiny_sd}",
            "--set", f"data.data_files=[{prompts}]", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", "max_train_steps=1", "--set", "train_batch_size=2", "--set", "method_options.rounds=1",
            "--set", "method_options.steps_per_round=1", "--set", "method_options.sampler_steps=2",
            "--set", "use_lora=true", "--set", "rank=4"]
    assert main(args) == 0
    (row,) = metrics_rows(tmp_path)
    assert np.isfinite(row["loss"]) and 0.0 <= row["reward_mean"] <= 1.0 and row["round"] == 1
    # the oracle's parts, separately (a method that raises one part by breaking another shows it)
    from diffusion_po.eval.scorers import build_scorer

    oracle = build_scorer("toy")
    parts = [m for m in oracle.metrics if m != oracle.primary]
    assert parts
    for part in parts:
        assert np.isfinite(row[f"reward/{part}"])
        assert row[f"round/reward/{part}"] == pytest.approx(row[f"reward/{part}"])


def test_curated_all_real_samples_nothing(tmp_path, tiny_sd, data):
    """lambda = 1: every row keeps its real image; nothing is sampled or scored (plain fine-tuning)."""
    RednessReward.calls.clear()
    cfg = write_config(tmp_path, tiny_sd, "curated", data["images"], "images", {"real_data_fraction": 1.0})
    assert main(["train", str(cfg)]) == 0
    rows = metrics_rows(tmp_path)
    assert RednessReward.calls == [] and all(r["real_fraction"] == 1.0 and np.isfinite(r["loss"]) for r in rows)
    assert "reward_mean" not in rows[0]
