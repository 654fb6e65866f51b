"""The shared trainer end to end on tiny models: every family, LoRA and full, resume, outputs, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_po.cli import main
from diffusion_po.config import load_train_config
from diffusion_po.errors import DataError, ModelLoadError, UserError
from tests.helpers import write_pickapic


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory) -> Path:
    return write_pickapic(tmp_path_factory.mktemp("data") / "train.parquet", n=24, ties=2, corrupt=[7])


def make_config(tmp_path: Path, model: str, data_file: Path, **overrides) -> Path:
    cfg = {
        "pretrained_model_name_or_path": model,
        "output_dir": str(tmp_path / "out"),
        "resolution": 32,
        "train_batch_size": 2,
        "max_train_steps": 1,
        "learning_rate": 1e-4,
        "checkpointing_steps": 1000,
        "report_to": "none",
        "data": {"format": "pickapic", "data_files": [str(data_file)]},
    }
    data_over = overrides.pop("data", {})
    cfg.update(overrides)
    cfg["data"].update(data_over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
@pytest.mark.parametrize("lora", [True, False])
def test_one_dpo_step_each_family(tmp_path, tiny_model_factory, pickapic, family, lora):
    # beta_dpo 50 rather than the default 5000: at 5000 the float noise between two separate forward
    # passes (policy in grad mode, frozen reference copy in inference mode) is amplified past 1e-4.
    cfg = make_config(tmp_path, tiny_model_factory(family), pickapic, use_lora=lora, max_train_steps=2, beta_dpo=50.0)
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # policy == reference at the first step
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if lora:
        assert (out / "pytorch_lora_weights.safetensors").is_file()
    else:
        net = "transformer" if family == "sd3" else "unet"
        assert (out / net / "config.json").is_file()
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoint-2").is_dir()


def test_v_prediction_target_is_velocity(tiny_model_factory):
    from diffusion_po.families import load_family

    fam = load_family(tiny_model_factory("sd", "v_prediction"))
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    expected = fam.noise_scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(fam.training_target(x0, noise, t), expected, rtol=1e-5, atol=1e-5)
    x_t = fam.noisy_latents(x0, noise, t)
    torch.testing.assert_close(fam.x0_from_prediction(x_t, expected, t), x0, rtol=1e-4, atol=1e-4)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def test_resume_after_kill_matches_uninterrupted(tmp_path, tiny_model_factory, pickapic):
    model = tiny_model_factory("sd")
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full_dir.mkdir()
    split_dir.mkdir()
    common = dict(max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear", lr_warmup_steps=1,
                  proportion_empty_prompts=0.3, data={"random_crop": True})
    cfg_full = make_config(full_dir, model, pickapic, **common)
    assert main(["train", str(cfg_full)]) == 0
    cfg_split = make_config(split_dir, model, pickapic, **common)
    env = dict(os.environ, DIFFUSION_PO_DIE_AFTER_STEP="2")
    proc = subprocess.run([sys.executable, "-m", "diffusion_po.cli", "train", str(cfg_split)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert (split_dir / "out" / "checkpoint-2").is_dir() and not (split_dir / "out" / "unet").exists()
    assert main(["train", str(cfg_split), "--resume"]) == 0
    full_rows, split_rows = read_metrics(full_dir / "out"), read_metrics(split_dir / "out")
    assert [r["step"] for r in split_rows] == [1, 2, 3, 4]
    for a, b in zip(full_rows, split_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["lr"] == pytest.approx(b["lr"])
    wa, wb = _weights(full_dir / "out" / "unet"), _weights(split_dir / "out" / "unet")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-7)


def test_partial_checkpoint_is_ignored_and_rotation(tmp_path, tiny_model_factory, pickapic):
    cfg = make_config(tmp_path, tiny_model_factory("sd"), pickapic, use_lora=True, max_train_steps=3,
                      checkpointing_steps=1, checkpoints_total_limit=2)
    out = tmp_path / "out"
    (out / ".checkpoint-99.partial").mkdir(parents=True)  # what a kill mid-write leaves behind
    assert main(["train", str(cfg)]) == 0
    names = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-2", "checkpoint-3"]
    assert (out / "checkpoint-3" / "pytorch_lora_weights.safetensors").is_file()
    from diffusion_po.training.checkpoint import resolve_resume

    assert resolve_resume(out, "latest").name == "checkpoint-3"
    with pytest.raises(UserError, match="does not exist"):
        resolve_resume(out, "checkpoint-7")


def test_outputs_load_in_stock_diffusers(tmp_path, tiny_model_factory, pickapic):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from diffusion_po.training.trainer import Trainer

    model = tiny_model_factory("sd")
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    emb = torch.randn(2, 77, 32)

    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    trainer = Trainer(load_train_config(make_config(lora_dir, model, pickapic, use_lora=True, max_train_steps=2,
                                                    learning_rate=1e-2)))
    trainer.run()
    with torch.no_grad():
        trained = trainer.unwrapped(x, t, emb).sample
    pipe = DiffusionPipeline.from_pretrained(model, safety_checker=None)
    with torch.no_grad():
        before = pipe.unet(x, t, emb).sample
    pipe.load_lora_weights(str(lora_dir / "out"))
    with torch.no_grad():
        after = pipe.unet(x, t, emb).sample
    assert (before - trained).abs().max() > 1e-4  # training changed the network
    torch.testing.assert_close(after, trained, rtol=1e-4, atol=1e-5)

    full_dir = tmp_path / "full"
    full_dir.mkdir()
    trainer = Trainer(load_train_config(make_config(full_dir, model, pickapic, max_train_steps=2,
                                                    save_full_pipeline=True)))
    trainer.run()
    with torch.no_grad():
        trained = trainer.unwrapped(x, t, emb).sample
    unet = UNet2DConditionModel.from_pretrained(full_dir / "out", subfolder="unet")
    whole = DiffusionPipeline.from_pretrained(full_dir / "out")
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, emb).sample, trained, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(whole.unet(x, t, emb).sample, trained, rtol=1e-4, atol=1e-5)


def test_bad_rows_are_counted_or_stop_in_strict_mode(tmp_path, tiny_model_factory):
    data = write_pickapic(tmp_path / "bad.parquet", n=8, corrupt=[0, 1, 2, 3, 4, 5])
    cfg = make_config(tmp_path, tiny_model_factory("sd"), data, max_train_steps=4, use_lora=True)
    assert main(["train", str(cfg)]) == 0
    assert read_metrics(tmp_path / "out")[-1]["bad_rows"] >= 1
    cfg = make_config(tmp_path, tiny_model_factory("sd"), data, data={"strict": True},
                      output_dir=str(tmp_path / "strict"))
    from diffusion_po.training.trainer import train

    with pytest.raises(DataError, match=r"row \d+: UnidentifiedImageError"):
        train(load_train_config(cfg))


def test_bad_rows_counts_distinct_rows_not_visits(tmp_path, tiny_model_factory, caplog):
    """8 rows, 2 of them bad, batch 2: 6 steps (12 draws) pass over every row at least once, some twice; the count
    stays 2 and each bad row is logged once, with its file and row."""
    data = write_pickapic(tmp_path / "bad.parquet", n=8, corrupt=[1, 5])
    cfg = make_config(tmp_path, tiny_model_factory("sd"), data, max_train_steps=6, use_lora=True)
    with caplog.at_level("WARNING", logger="diffusion_po.train"):
        assert main(["train", str(cfg)]) == 0
    rows = read_metrics(tmp_path / "out")
    assert rows[-1]["bad_rows"] == 2
    warned = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped"))
    assert len(warned) == 2
    assert warned[0].startswith(f"skipped {data} row 1: UnidentifiedImageError")
    assert warned[1].startswith(f"skipped {data} row 5: UnidentifiedImageError")


@pytest.mark.slow
def test_bad_rows_are_distinct_over_processes(tmp_path, tiny_model_factory):
    """2 processes: each decodes its half of every global batch, so the bad row, met on either process in 8
    epochs, counts once, as in 1 process; a micro-batch with no usable row on one process is skipped by all
    (not a hang)."""
    data = write_pickapic(tmp_path / "bad.parquet", n=8, corrupt=[1])
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    model = tiny_model_factory("sd")
    cfg1 = make_config(one, model, data, train_batch_size=2, max_train_steps=32, use_lora=True)  # 8 epochs
    cfg2 = make_config(two, model, data, train_batch_size=1, max_train_steps=32, use_lora=True)
    assert main(["train", str(cfg1)]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
         "-m", "diffusion_po.cli", "train", str(cfg2)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(one / "out")[-1]["bad_rows"] == read_metrics(two / "out")[-1]["bad_rows"] == 1


def test_bad_data_sets_give_clear_errors(tmp_path, tiny_model_factory):
    from diffusion_po.training.trainer import train

    model = tiny_model_factory("sd")
    no_label = write_pickapic(tmp_path / "nolabel.parquet", n=4, drop_columns=["label_0"])
    with pytest.raises(DataError, match="label_0"):
        train(load_train_config(make_config(tmp_path, model, no_label)))
    all_ties = write_pickapic(tmp_path / "ties.parquet", n=4, ties=4)
    with pytest.raises(DataError, match="no usable rows"):
        train(load_train_config(make_config(tmp_path, model, all_ties)))
    with pytest.raises(DataError, match="not found"):
        train(load_train_config(make_config(tmp_path, model, tmp_path / "missing.parquet")))


def test_damaged_data_file_is_one_line_from_the_cli(tmp_path, tiny_model_factory, capsys):
    garbage = tmp_path / "train.parquet"
    garbage.write_bytes(b"\x00garbage" * 50)
    assert main(["train", str(make_config(tmp_path, tiny_model_factory("sd"), garbage))]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{garbage} is not a readable parquet file" in err and "Traceback" not in err


def test_missing_model_and_resume_folder(tmp_path, tiny_model_factory, pickapic, capsys):
    cfg = make_config(tmp_path, str(tmp_path / "no_such_model"), pickapic)
    assert main(["train", str(cfg)]) == 2
    assert "does not exist" in capsys.readouterr().err
    from diffusion_po.families import load_family

    with pytest.raises(ModelLoadError, match="offline"):
        load_family("nobody-here/no-such-model")
    cfg = make_config(tmp_path, tiny_model_factory("sd"), pickapic, resume_from_checkpoint="checkpoint-5")
    assert main(["train", str(cfg)]) == 2
    assert "checkpoint-5" in capsys.readouterr().err


def test_nonfinite_losses_skip_steps_then_stop(tmp_path, tiny_model_factory, pickapic):
    from diffusion_po.training.trainer import TrainingError, train

    cfg = make_config(tmp_path, tiny_model_factory("sd"), pickapic, beta_dpo=float("inf"), max_nonfinite_steps=2,
                      max_train_steps=5)
    with pytest.raises(TrainingError, match="2 steps in a row had a NaN/inf loss"):
        train(load_train_config(cfg))


def test_out_of_memory_names_the_knobs(tmp_path, tiny_model_factory, pickapic, monkeypatch):
    from diffusion_po.objectives.dpo import DiffusionDPO
    from diffusion_po.training.trainer import TrainingError, train

    def boom(self, ctx, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(DiffusionDPO, "compute_loss", boom)
    with pytest.raises(TrainingError, match="train_batch_size.*gradient_checkpointing.*LoRA"):
        train(load_train_config(make_config(tmp_path, tiny_model_factory("sd"), pickapic)))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_model_factory, pickapic):
    """2 CPU processes (gloo, torchrun) x 2 pairs == 1 process x 4 pairs: same losses, same weights."""
    model = tiny_model_factory("sd")
    clean = write_pickapic(tmp_path / "clean.parquet", n=16)  # no bad rows: every process gets full batches
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    # a moderate beta keeps the comparison well conditioned: beta 5000 amplifies float reduction-order
    # noise (batch 4 vs 2 kernels) by 2500x into the loss
    cfg1 = make_config(one, model, clean, train_batch_size=4, max_train_steps=3, beta_dpo=50.0)
    cfg2 = make_config(two, model, clean, train_batch_size=2, max_train_steps=3, beta_dpo=50.0)
    assert main(["train", str(cfg1)]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "diffusion_po.cli", "train", str(cfg2)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1, r2 = read_metrics(one / "out"), read_metrics(two / "out")
    assert len(r1) == len(r2) == 3
    for a, b in zip(r1, r2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    # Adam divides by sqrt(v): elements with ~zero gradient move by float noise, so compare the updates
    # as a whole: the two runs' weight changes agree to 1% of their size
    w0 = _weights(Path(model) / "unet")
    w1, w2 = _weights(one / "out" / "unet"), _weights(two / "out" / "unet")
    delta1 = torch.cat([(w1[k] - w0[k]).flatten() for k in w0])
    delta2 = torch.cat([(w2[k] - w0[k]).flatten() for k in w0])
    assert delta1.norm() > 0
    assert (delta1 - delta2).norm() / delta1.norm() < 1e-2
