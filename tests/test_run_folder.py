"""The run folder is protected: one run at a time, no mixing of runs, verified checkpoints with fallback,
resume that refuses a config changing the checkpoint's meaning, whole-line metrics trimmed on resume,
an atomic final save, one-line errors for a full disk, an exploded run, a bad output_dir, a multi-CPU
launch that started one process, and a tracker that is not installed."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion_po.cli import main
from diffusion_po.config import load_train_config
from diffusion_po.errors import ConfigError, UserError
from diffusion_po.training import run_folder
from diffusion_po.training.checkpoint import list_checkpoints, resolve_resume, verify
from tests.helpers import write_pickapic
from tests.test_train import make_config, read_metrics


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> Path:
    return write_pickapic(tmp_path_factory.mktemp("data") / "train.parquet", n=24)


def lora_config(tmp_path: Path, model: str, data: Path, **overrides) -> Path:
    settings = dict(use_lora=True, rank=4, max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3)
    settings.update(overrides)
    return make_config(tmp_path, model, data, **settings)


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "pytorch_lora_weights.safetensors")


# ---------------------------------------------------------------- one run per folder
def test_fresh_run_into_used_folder_stops_and_overwrite_replaces(tmp_path, tiny_sd, clean_data, capsys):
    out = tmp_path / "out"
    assert main(["train", str(lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=3, checkpointing_steps=1))]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    capsys.readouterr()
    cfg = lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=2, checkpointing_steps=2)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "already holds a run" in err and "--overwrite" in err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]  # untouched
    assert main(["train", str(cfg), "--overwrite"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]  # the old run's checkpoints are gone


def test_second_run_on_a_locked_folder_stops_and_the_lock_is_released(tmp_path, tiny_sd, clean_data, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from diffusion_po.training.run_folder import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
         "print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", str(lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=1))]) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another run (pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", str(lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=1))]) == 0
    run_folder.RunLock(out).acquire().release()  # released at the end of the run


def test_output_dir_that_is_a_file_fails_before_the_model_loads(tmp_path, clean_data, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for output_dir in (a_file, a_file / "run"):
        cfg = make_config(tmp_path, str(tmp_path / "no_such_model"), clean_data, output_dir=str(output_dir))
        assert main(["train", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert "is a file" in err and "no_such_model" not in err


@pytest.mark.parametrize("limit", [0, -1])
def test_checkpoints_total_limit_must_be_positive_or_null(tmp_path, clean_data, limit):
    with pytest.raises(ConfigError, match="checkpoints_total_limit.*null to keep all"):
        load_train_config(make_config(tmp_path, "m", clean_data, checkpoints_total_limit=limit))


# ---------------------------------------------------------------- resume
def test_resume_refuses_a_change_of_meaning_and_records_the_others(tmp_path, tiny_sd, clean_data, capsys):
    out = tmp_path / "out"
    assert main(["train", str(lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=2))]) == 0
    capsys.readouterr()
    for key, value, shown in [("rank", 8, "rank: 4, the config has 8"), ("resolution", 64, "resolution: 32"),
                              ("method", "sft", "method: 'dpo'"), ("use_lora", False, "holds a LoRA")]:
        cfg = lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=3, **{key: value})
        assert main(["train", str(cfg), "--resume"]) == 2
        err = capsys.readouterr().err
        assert shown in err and "checkpoint-2" in err and len(err.strip().splitlines()) == 1, err
    cfg = lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=3, learning_rate=5e-4)
    assert main(["train", str(cfg), "--resume"]) == 0
    assert "learning_rate: 0.001 -> 0.0005" in capsys.readouterr().out
    history = [json.loads(line) for line in (out / "resume_history.jsonl").read_text().splitlines()]
    assert history[-1]["checkpoint"] == "checkpoint-2" and history[-1]["step"] == 2
    assert history[-1]["changed"] == {"learning_rate": [1e-3, 5e-4], "max_train_steps": [2, 3]}
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_resuming_a_full_checkpoint_with_use_lora_is_one_line(tmp_path, tiny_sd, clean_data, capsys):
    assert main(["train", str(make_config(tmp_path, tiny_sd, clean_data, max_train_steps=1))]) == 0
    capsys.readouterr()
    cfg = lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=2)
    assert main(["train", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint-1 holds a full fine-tune but the config has use_lora: true" in err
    assert len(err.splitlines()) == 1


def test_resume_without_a_checkpoint_says_it_starts_from_scratch(tmp_path, tiny_sd, clean_data, capsys):
    assert main(["train", str(lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=1)), "--resume"]) == 0
    assert f"resume: no checkpoint in {tmp_path / 'out'} yet; starting from scratch" in capsys.readouterr().out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated safetensors": lambda c: _truncate(c / "model.safetensors"),
    "missing optimizer": lambda c: (c / "optimizer.bin").unlink(),
    "truncated pickle": lambda c: _truncate(c / "random_states_0.pkl"),
    "changed bytes in the LoRA": lambda c: _flip_byte(c / "pytorch_lora_weights.safetensors"),
    "missing manifest entry file": lambda c: (c / "config.yaml").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, tiny_sd, clean_data, capsys, damage):
    out = tmp_path / "out"
    cfg = lora_config(tmp_path, tiny_sd, clean_data)
    assert main(["train", str(cfg)]) == 0
    trained = lora_weights(out)
    rows = read_metrics(out)
    DAMAGE[damage](out / "checkpoint-4")
    assert verify(out / "checkpoint-4") is not None and verify(out / "checkpoint-2") is None
    with pytest.raises(UserError, match="checkpoint-4 is damaged"):
        resolve_resume(out, "checkpoint-4")
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint-4 is damaged" in printed and "resuming from checkpoint-2" in printed
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]  # steps 3-4 again, once each
    for a, b in zip(rows, read_metrics(out)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    again = lora_weights(out)
    for k in trained:  # the resumed run is the same run
        torch.testing.assert_close(again[k], trained[k], rtol=0, atol=1e-7)


MORE_DAMAGE = {
    "empty safetensors": lambda c: (c / "model.safetensors").write_bytes(b""),
    "empty pickle": lambda c: (c / "custom_checkpoint_0.pkl").write_bytes(b""),
    "missing scheduler": lambda c: (c / "scheduler.bin").unlink(),
    "missing LoRA": lambda c: (c / "pytorch_lora_weights.safetensors").unlink(),
    "garbage manifest": lambda c: (c / "manifest.json").write_text("{not json"),
    "flipped optimizer byte": lambda c: _flip_byte(c / "optimizer.bin"),
    "appended bytes": lambda c: (c / "random_states_0.pkl").open("ab").write(b"xx"),
    "truncated optimizer": lambda c: _truncate(c / "optimizer.bin"),
    "zeroed model bytes": lambda c: (c / "model.safetensors").write_bytes(
        bytes(len((c / "model.safetensors").read_bytes()))),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_sd, clean_data) -> Path:
    root = tmp_path_factory.mktemp("finished")
    assert main(["train", str(lora_config(root, tiny_sd, clean_data))]) == 0
    return root / "out"


@pytest.mark.parametrize("damage", sorted(MORE_DAMAGE))
def test_more_kinds_of_damage_are_found(tmp_path, finished_run, damage):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    MORE_DAMAGE[damage](out / "checkpoint-4")
    reports: list[str] = []
    assert resolve_resume(out, "latest", report=reports.append) == out / "checkpoint-2"
    assert len(reports) == 1 and "checkpoint-4 is damaged" in reports[0], reports


def test_every_checkpoint_damaged_is_one_line(tmp_path, tiny_sd, clean_data, capsys):
    out = tmp_path / "out"
    cfg = lora_config(tmp_path, tiny_sd, clean_data)
    assert main(["train", str(cfg)]) == 0
    for c in list_checkpoints(out):
        _truncate(c / "model.safetensors")
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err


def test_metrics_are_trimmed_to_the_resumed_step_and_torn_lines_dropped(tmp_path, tiny_sd, clean_data):
    out = tmp_path / "out"
    cfg = lora_config(tmp_path, tiny_sd, clean_data)
    assert main(["train", str(cfg)]) == 0
    rows = read_metrics(out)
    shutil.rmtree(out / "checkpoint-4")  # as if killed after step 4's row, before its checkpoint
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"loss": 0.69, "st')  # a torn line, e.g. from a full disk
    assert main(["train", str(cfg), "--resume"]) == 0
    again = read_metrics(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows], rel=1e-6, abs=1e-7)


def test_a_row_that_cannot_be_written_whole_leaves_no_torn_line(tmp_path, monkeypatch):
    log = run_folder.MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "loss": 0.5})
    real_write = os.write

    def short_write(fd, data):
        return real_write(fd, data[:5])  # what a full disk does

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OSError):
        log.append({"step": 2, "loss": 0.4})
    monkeypatch.setattr(os, "write", real_write)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'


# ---------------------------------------------------------------- saving
@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                 "data/0: file write failed"),
    OSError(errno.ENOSPC, "No space left on device"),
])
@pytest.mark.parametrize("asynchronous", [False, True])
def test_full_disk_during_a_checkpoint_is_one_message_and_leaves_no_partial(tmp_path, tiny_sd, clean_data,
                                                                            monkeypatch, error, asynchronous):
    import accelerate.checkpointing

    from diffusion_po.training.trainer import TrainingError, train

    real_save = accelerate.checkpointing.save

    def save_until_full(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path):
            Path(path).write_bytes(b"half a file")
            raise error
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save_until_full)
    out = tmp_path / "out"
    cfg = load_train_config(lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=2, checkpointing_steps=1,
                                        async_checkpointing=asynchronous))  # (async: raised at the next wait)
    with pytest.raises(TrainingError) as info:
        train(cfg)
    message = str(info.value)
    assert message.startswith("the disk is full") and ".checkpoint-2.partial" in message
    assert "GiB free" in message and "a checkpoint needs about" in message
    assert [p.name for p in out.iterdir() if "checkpoint" in p.name] == ["checkpoint-1"]
    monkeypatch.setattr(accelerate.checkpointing, "save", real_save)
    cfg.resume_from_checkpoint = "latest"
    train(cfg)
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_final_save_is_atomic(tmp_path, tiny_sd, clean_data, monkeypatch):
    from diffusers import ModelMixin

    from diffusion_po.training.trainer import train

    out = tmp_path / "out"
    cfg = load_train_config(make_config(tmp_path, tiny_sd, clean_data, max_train_steps=1))
    train(cfg)
    before = {p.name: p.read_bytes() for p in (out / "unet").iterdir()}
    real = ModelMixin.save_pretrained

    def killed_midway(self, folder, *args, **kwargs):
        if run_folder.FINAL_STAGING in str(folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "config.json").write_text("{}")
            raise KeyboardInterrupt  # stands for a kill after config.json, before the weights
        return real(self, folder, *args, **kwargs)

    monkeypatch.setattr(ModelMixin, "save_pretrained", killed_midway)
    cfg.resume_from_checkpoint, cfg.max_train_steps = "latest", 2
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert {p.name: p.read_bytes() for p in (out / "unet").iterdir()} == before  # the old outputs, whole
    monkeypatch.setattr(ModelMixin, "save_pretrained", real)
    train(cfg)
    assert not (out / run_folder.FINAL_STAGING).exists()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_kill_between_the_renames_restores_the_old_outputs(tmp_path):
    old = tmp_path / ".final.old-unet"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (tmp_path / run_folder.FINAL_STAGING).mkdir()
    run_folder.recover_final(tmp_path)
    assert (tmp_path / "unet" / "config.json").is_file() and not old.exists()
    assert not (tmp_path / run_folder.FINAL_STAGING).exists()


# ---------------------------------------------------------------- exploded runs
def test_non_finite_weights_are_not_committed(tmp_path, tiny_sd, clean_data, monkeypatch):
    from diffusion_po.objectives.dpo import DiffusionDPO
    from diffusion_po.training.trainer import TrainingError, train

    def explode(self, ctx, step):
        if step == 2:
            next(p for p in ctx.trainable_network.parameters() if p.requires_grad).data.fill_(float("inf"))

    monkeypatch.setattr(DiffusionDPO, "on_optimizer_step", explode)
    cfg = load_train_config(lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=3, checkpointing_steps=1))
    with pytest.raises(TrainingError, match="step 2: the trained weights hold NaN/inf, so checkpoint-2 was not"):
        train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-1"]


def test_a_loss_spike_is_not_committed(tmp_path, tiny_sd, clean_data, monkeypatch):
    from diffusion_po.objectives.dpo import DiffusionDPO
    from diffusion_po.training.trainer import TrainingError, train

    real = DiffusionDPO.compute_loss
    calls = {"n": 0}

    def blow_up_after_three(self, ctx, batch):
        calls["n"] += 1
        loss, metrics = real(self, ctx, batch)
        if calls["n"] > 3:
            loss = loss * 1e4 + 1e4  # finite, but exploded
            metrics = dict(metrics, loss=loss.detach())
        return loss, metrics

    monkeypatch.setattr(DiffusionDPO, "compute_loss", blow_up_after_three)
    cfg = load_train_config(lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=6, checkpointing_steps=3))
    with pytest.raises(TrainingError, match=r"step 6: the loss since the last checkpoint is .*x its earlier median"):
        train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-3"]
    cfg = load_train_config(lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=6, checkpointing_steps=3,
                                        max_loss_spike_ratio=None, output_dir=str(tmp_path / "off")))
    calls["n"] = 0
    train(cfg)  # the check is off


def test_loss_spike_ratio():
    from diffusion_po.training.trainer import loss_spike_ratio

    assert loss_spike_ratio([1.0, 1.0, 1.0, 50.0, 60.0], window=2) == pytest.approx(55.0)
    assert loss_spike_ratio([1.0, 50.0], window=1) is None  # too little history
    assert loss_spike_ratio([1.0, 1.0, 1.0, 1.0, 200.0, 1.0, 1.0], window=3) == pytest.approx(1.0)  # one outlier


# ---------------------------------------------------------------- launch and trackers
def test_accelerate_multi_cpu_launch_that_started_one_process_is_refused(tmp_path, tiny_sd, clean_data):
    cfg = lora_config(tmp_path, tiny_sd, clean_data, max_train_steps=1)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                           "-m", "diffusion_po.cli", "train", str(cfg)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode != 0
    assert "started one" in proc.stderr and "torchrun --nproc_per_node" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    assert time.perf_counter() - started < 300


def test_report_to_a_tracker_that_is_not_installed(tmp_path, clean_data, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, whether or not it is installed
    for report_to in ("wandb", "all"):
        cfg = make_config(tmp_path, str(tmp_path / "no_such_model"), clean_data, report_to=report_to)
        assert main(["train", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"report_to: {report_to} needs wandb, which is not installed" in err
