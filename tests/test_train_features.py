"""Trainer features: gradient accumulation, EMA, gradient checkpointing, trackers, accelerate launch."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from diffusion_po.cli import main
from tests.helpers import write_pickapic
from tests.test_train import make_config, read_metrics


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory):
    return write_pickapic(tmp_path_factory.mktemp("clean") / "train.parquet", n=16)


def test_gradient_accumulation_counts_micro_steps(tmp_path, tiny_model_factory, clean_data):
    """2 micro-batches per optimizer step: the optimizer steps max_train_steps times on twice the data."""
    from diffusion_po.config import load_train_config
    from diffusion_po.training.trainer import Trainer

    cfg = make_config(tmp_path, tiny_model_factory("sd"), clean_data, train_batch_size=2,
                      gradient_accumulation_steps=2, max_train_steps=3, lr_scheduler="linear")
    trainer = Trainer(load_train_config(cfg))
    trainer.run()
    assert trainer.state.step == 3 and trainer.state.micro_step == 6
    rows = read_metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2, 3]
    lrs = [r["lr"] for r in rows]
    assert lrs[0] > lrs[1] > lrs[2]  # the schedule advanced once per optimizer step, not per micro-step


def test_ema_checkpointing_and_tensorboard(tmp_path, tiny_model_factory, clean_data):
    cfg = make_config(tmp_path, tiny_model_factory("sd"), clean_data, use_ema=True, ema_decay=0.5,
                      gradient_checkpointing=True, report_to="tensorboard", max_train_steps=2,
                      checkpointing_steps=1)
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "out"
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "checkpoint-1").is_dir() and (out / "unet").is_dir()
    # resuming a finished run is a no-op that still writes the outputs
    assert main(["train", str(cfg), "--resume"]) == 0
    assert len(read_metrics(out)) == 2


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_runs_under_accelerate_launch(tmp_path, tiny_model_factory, clean_data):
    cfg = make_config(tmp_path, tiny_model_factory("sd"), clean_data, use_lora=True)
    proc = subprocess.run(
        [shutil.which("accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffusion_po.cli", "train", str(cfg)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_cli_verbs_help_and_version(capsys):
    from diffusion_po.cli import VERBS

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "diffusion-po" in capsys.readouterr().out
    for verb in VERBS:
        with pytest.raises(SystemExit) as exc:
            main([verb, "--help"])
        assert exc.value.code == 0
        assert "usage: diffusion-po " + verb in capsys.readouterr().out
    assert main(["env"]) == 0
    assert "torch" in capsys.readouterr().out
