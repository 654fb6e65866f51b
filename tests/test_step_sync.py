"""The training step reads the device at most once per optimizer step, skips a non-finite window on the
device with the fused optimizer, and a failed compilation under `compile: auto` is reported, not hidden."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from diffusion_po.config import TrainConfig, from_dict
from tests.test_fast import _batch

PACKAGE = str(Path(__file__).resolve().parents[1] / "diffusion_po")
#: calls that make the host wait for the device (on a GPU); counted when our own code makes them
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def _trainer(tmp_path, model: str, **keys):
    from diffusion_po.training.trainer import Trainer

    cfg = from_dict(TrainConfig, {
        "pretrained_model_name_or_path": model, "output_dir": str(tmp_path / "run"), "resolution": 32,
        "train_batch_size": 2, "learning_rate": 1e-3, "beta_dpo": 50.0, "report_to": "none", "seed": 3,
        "prefetch_to_device": False, "data": {"format": "pickapic"}, **keys,
    })
    torch.manual_seed(0)
    return Trainer(cfg)




@contextlib.contextmanager
def count_host_reads():
    """Count syncing tensor calls made directly from diffusion_po's own code (torch's internals, e.g. the
    CPU optimizer's step counters, are not ours to count)."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                calls.append(f"{name} at {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize(("fused", "dropout"), [(False, 0.0), (True, 0.0), (True, 0.5)])
def test_train_step_reads_the_device_at_most_once(tmp_path, tiny_sd, fused, dropout):
    """With prompt dropout too (the Salesforce recipe's 0.2): its draws come from a host generator."""
    trainer = _trainer(tmp_path, tiny_sd, gradient_accumulation_steps=2, fused_optimizer=fused,
                       proportion_empty_prompts=dropout)
    assert trainer.skips_on_device is fused
    for _ in range(2):  # two optimizer steps of two micro-steps each
        with count_host_reads() as calls:
            assert trainer.train_step(_batch()) is None  # inside the window: nothing read
        assert calls == []
        with count_host_reads() as calls:
            finite, metrics = trainer.train_step(_batch())
        assert len(calls) <= 1, calls
        assert finite and metrics["loss"] > 0 and set(metrics) >= {"loss", "implicit_acc"}


def _weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.unwrapped.parameters() if p.requires_grad]


@pytest.mark.parametrize("fused", [False, True])
def test_a_non_finite_window_changes_nothing(tmp_path, tiny_sd, fused):
    """NaN in one micro-step of the window: no update, no optimizer step counted, no scheduler step; the
    next window trains. With the fused optimizer the skip happens on the device (`found_inf`)."""
    trainer = _trainer(tmp_path, tiny_sd, gradient_accumulation_steps=2, fused_optimizer=fused,
                       lr_scheduler="linear", lr_warmup_steps=0, max_train_steps=10)
    compute = trainer.method.compute_loss
    calls = {"n": 0}

    def poisoned(ctx, batch):
        loss, metrics = compute(ctx, batch)
        calls["n"] += 1
        return (loss * float("nan"), metrics) if calls["n"] == 2 else (loss, metrics)

    trainer.method.compute_loss = poisoned
    before, lr = _weights(trainer), trainer.lr_scheduler.get_last_lr()[0]
    assert trainer.train_step(_batch()) is None
    finite, metrics = trainer.train_step(_batch())
    assert not finite and metrics == {}
    for a, b in zip(before, _weights(trainer)):
        assert torch.equal(a, b)
    assert trainer.lr_scheduler.get_last_lr()[0] == lr
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert all(float(s.get("step", 0)) == 0 for s in inner.state.values())
    assert all(p.grad is None for p in trainer.unwrapped.parameters())
    trainer.train_step(_batch())
    finite, _ = trainer.train_step(_batch())
    assert finite and any(not torch.equal(a, b) for a, b in zip(before, _weights(trainer)))
    assert all(float(s["step"]) == 1 for s in inner.state.values())
    assert trainer.lr_scheduler.get_last_lr()[0] < lr


def test_auto_compile_never_hides_errors_globally(tmp_path, tiny_sd):
    """`compile: auto` no longer turns on dynamo's suppress_errors (which ran eager silently)."""
    import torch._dynamo as dynamo

    dynamo.config.suppress_errors = False
    _trainer(tmp_path, tiny_sd, compile="auto")
    assert dynamo.config.suppress_errors is False


def test_failed_compile_under_auto_is_reported_and_the_step_redone_eagerly(tmp_path, tiny_sd, capsys):
    """A backend that fails: the first step is redone eagerly with the same draws (same loss as a run
    without compilation) and the failure is in `trainer.compiled` and the log."""
    import torch._dynamo as dynamo
    from torch._dynamo import register_backend

    def broken_backend(gm, example_inputs):
        raise RuntimeError("this backend always fails")

    register_backend(name="dpo_test_broken", compiler_fn=broken_backend)
    dynamo.reset()
    plain = _trainer(tmp_path / "plain", tiny_sd, compile="none")
    expected = plain.train_step(_batch())[1]["loss"]

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    trainer = _trainer(tmp_path / "auto", tiny_sd, compile="blocks", compile_backend="dpo_test_broken")
    trainer._compile_fallback_pending = True  # what `compile: auto` sets on a GPU
    finite, metrics = trainer.train_step(_batch())
    assert finite and metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert trainer.compiled.startswith("failed (") and "running eager" in trainer.compiled
    assert "this backend always fails" in trainer.compile_error
    assert "torch.compile failed" in capsys.readouterr().out
    dynamo.reset()


def test_explicit_compile_failure_is_an_error(tmp_path, tiny_sd):
    """`compile: blocks` asked for explicitly: a failing backend stops the step (not hidden)."""
    import torch._dynamo as dynamo
    from torch._dynamo import register_backend

    def broken_backend(gm, example_inputs):
        raise RuntimeError("explicitly broken")

    register_backend(name="dpo_test_broken2", compiler_fn=broken_backend)
    dynamo.reset()
    trainer = _trainer(tmp_path, tiny_sd, compile="blocks", compile_backend="dpo_test_broken2")
    with pytest.raises(Exception, match="explicitly broken"):
        trainer.train_step(_batch())
    dynamo.reset()


def test_loader_workers_default_to_none_on_the_cpu_and_some_on_a_gpu(tmp_path):
    from diffusion_po.config import default_num_workers

    cfg = from_dict(TrainConfig, {"pretrained_model_name_or_path": "x", "data": {"format": "pickapic"}})
    assert cfg.dataloader_num_workers is None
    assert default_num_workers(cfg, "cpu") == 0
    assert 0 <= default_num_workers(cfg, "cuda") <= 4
    assert default_num_workers(cfg, "cuda", num_processes=10_000) == 0  # never more workers than cores
    cfg.dataloader_num_workers = 3
    assert default_num_workers(cfg, "cpu") == 3
