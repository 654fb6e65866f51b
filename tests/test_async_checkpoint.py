"""Asynchronous checkpoints (run here on the CPU, where they are off by default): the same checkpoint as the
synchronous write, taken at its step while training goes on; a kill mid-write leaves the previous
committed checkpoint; resume from them is bit for bit; the host copy keeps strides and shared storage."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusion_po.cli import main
from diffusion_po.training.checkpoint import list_checkpoints, resolve_resume, verify
from tests.helpers import write_pickapic
from tests.test_train import make_config, read_metrics


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> Path:
    return write_pickapic(tmp_path_factory.mktemp("data") / "train.parquet", n=24)


def _load(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    if path.suffix == ".json":
        return path.read_text()
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same(a, b, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def _assert_same_checkpoint(one: Path, two: Path) -> None:
    """Same files, and each loads to the same content (tensors bit for bit)."""
    names = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert names == sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file() and p.name != "manifest.json")
    for name in names:
        if name != "config.yaml":  # differs by async_checkpointing and output_dir only
            _assert_same(_load(one / name), _load(two / name), name)


def test_async_checkpoint_is_the_synchronous_one_taken_while_training_goes_on(tmp_path, tiny_sd, clean_data,
                                                                                monkeypatch):
    """Full fine-tune, 4 steps, checkpoints at 2 and 4. The async write of checkpoint-2 is held until step 3 has
    updated the weights: it still holds step 2's state, equal to the synchronous run's, and a resume from it
    ends bit for bit where the synchronous run ended."""
    import accelerate.checkpointing
    from accelerate.utils import set_seed

    from diffusion_po.objectives.dpo import DiffusionDPO

    common = dict(max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear", lr_warmup_steps=1,
                  proportion_empty_prompts=0.3)
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    sync_dir.mkdir()
    async_dir.mkdir()
    set_seed(0)  # the global generators (saved in random_states_0.pkl) start alike in both runs
    assert main(["train", str(make_config(sync_dir, tiny_sd, clean_data, async_checkpointing=False, **common))]) == 0

    real_save, real_step = accelerate.checkpointing.save, DiffusionDPO.on_optimizer_step
    step3, seen = threading.Event(), {}

    def held_save(obj, path, *args, **kwargs):
        if ".checkpoint-2.partial" in str(path) and "during" not in seen:
            seen["thread"] = threading.current_thread().name
            seen["during"] = step3.wait(timeout=300)  # training must reach step 3 while this write waits
            seen["committed"] = [p.name for p in list_checkpoints(async_dir / "out")]
        return real_save(obj, path, *args, **kwargs)

    def noting_step(self, ctx, step):
        real_step(self, ctx, step)
        if step == 3:
            step3.set()

    monkeypatch.setattr(accelerate.checkpointing, "save", held_save)
    monkeypatch.setattr(DiffusionDPO, "on_optimizer_step", noting_step)
    cfg_async = make_config(async_dir, tiny_sd, clean_data, async_checkpointing=True, **common)
    set_seed(0)
    assert main(["train", str(cfg_async)]) == 0
    assert seen["during"] and seen["thread"] == "write .checkpoint-2.partial"  # written by the writer, after step 3
    assert seen["committed"] == []  # not visible before its write finished
    monkeypatch.setattr(accelerate.checkpointing, "save", real_save)
    monkeypatch.setattr(DiffusionDPO, "on_optimizer_step", real_step)

    s, a = sync_dir / "out", async_dir / "out"
    for name in ("checkpoint-2", "checkpoint-4"):
        assert verify(a / name) is None
        _assert_same_checkpoint(s / name, a / name)
    assert not list(a.glob(".checkpoint-*"))
    assert main(["train", str(cfg_async), "--resume", "checkpoint-2"]) == 0  # (the config's own output_dir)
    assert [r["loss"] for r in read_metrics(a)] == [r["loss"] for r in read_metrics(s)]
    _assert_same(_load(a / "unet" / "diffusion_pytorch_model.safetensors"),
                 _load(s / "unet" / "diffusion_pytorch_model.safetensors"), "unet")


KILLED_MID_WRITE = """
import sys, threading
import accelerate.checkpointing as c
real = c.save
def never_finishes(obj, path, *args, **kwargs):
    if ".checkpoint-2.partial" in str(path):
        threading.Event().wait()  # the write of checkpoint-2 is under way when the process dies
    return real(obj, path, *args, **kwargs)
c.save = never_finishes
from diffusion_po.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


def test_a_kill_during_an_async_write_keeps_the_previous_checkpoint(tmp_path, tiny_sd, clean_data):
    """The process dies (as by SIGKILL) while checkpoint-2 is being written: checkpoint-1 is there, the half
    checkpoint-2 is never taken for one, and the resumed run ends bit for bit like an uninterrupted one."""
    common = dict(max_train_steps=3, checkpointing_steps=1, async_checkpointing=True)
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir()
    split.mkdir()
    assert main(["train", str(make_config(whole, tiny_sd, clean_data, **common))]) == 0
    cfg = make_config(split, tiny_sd, clean_data, **common)
    env = dict(os.environ, DIFFUSION_PO_DIE_AFTER_STEP="2", PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(cfg)], env=env, capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr[-2000:]
    out = split / "out"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]  # waited for by checkpoint-2's start
    assert (out / ".checkpoint-2.partial").is_dir()  # the half-written one, never renamed into place
    assert resolve_resume(out, "latest") == out / "checkpoint-1"
    assert main(["train", str(cfg), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(whole / "out")]
    _assert_same(_load(out / "unet" / "diffusion_pytorch_model.safetensors"),
                 _load(whole / "out" / "unet" / "diffusion_pytorch_model.safetensors"), "unet")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not list(out.glob(".checkpoint-*"))


def test_host_copy_keeps_strides_and_shared_storage_and_is_a_copy():
    from diffusion_po.training.async_checkpoint import HostCopier

    weight = torch.randn(3, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    state = {"w": weight, "tied": weight, "opt": [{"step": torch.tensor(2.0), "lr": 0.1}], "n": (1, "a")}
    copier = HostCopier()
    copier.begin()
    out = copier.copy(state)
    assert out["w"].stride() == weight.stride() and out["w"] is out["tied"]
    assert out["opt"][0]["lr"] == 0.1 and out["n"] == (1, "a")
    assert out["w"].data_ptr() != weight.data_ptr()
    before = weight.clone()
    weight.add_(1.0)  # training goes on
    assert torch.equal(out["w"], before)
    copier.begin()
    again = copier.copy(state)
    assert again["w"].data_ptr() == out["w"].data_ptr() and torch.equal(again["w"], weight)  # buffers reused


def test_async_checkpointing_where_accelerate_saves_sharded_state_is_one_line():
    from accelerate.utils import DistributedType, ProjectConfiguration

    from diffusion_po.training.async_checkpoint import supported

    def fake(kind, hooks=None):
        return SimpleNamespace(distributed_type=kind, _save_model_state_pre_hook=hooks or {},
                               project_configuration=ProjectConfiguration())

    assert supported(fake(DistributedType.NO)) is None and supported(fake(DistributedType.MULTI_GPU)) is None
    assert "FSDP" in supported(fake(DistributedType.FSDP))
    assert "hook" in supported(fake(DistributedType.NO, {0: print}))
