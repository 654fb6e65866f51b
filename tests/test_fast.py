"""Every speed switch keeps the loss: the fast path against the plain path on the same batch and seed."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion_po.config import TrainConfig, from_dict

PLAIN = {"compile": "none", "channels_last": False, "reference_inference_mode": False,
         "frozen_weights_in_weight_dtype": False, "prefetch_to_device": False}
#: fp32 on a GPU still runs convolutions in TF32 (cuDNN's default) and picks kernels by memory format:
#: compare at TF32 rounding there, at fp32 rounding on the CPU
TOL = (2e-3, 1e-4, 5e-3) if torch.cuda.is_available() else (1e-4, 1e-6, 1e-4)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test may pick its own mixed precision; accelerate keeps one per process unless reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def _trainer(tmp_path, model: str, name: str, **keys):
    from diffusion_po.training.trainer import Trainer

    cfg = from_dict(TrainConfig, {
        "pretrained_model_name_or_path": model, "output_dir": str(tmp_path / name), "resolution": 32,
        "train_batch_size": 2, "learning_rate": 1e-3, "beta_dpo": 50.0, "report_to": "none", "seed": 3,
        "allow_tf32": False,
        "data": {"format": "pickapic"}, **keys,
    })
    return Trainer(cfg)


def _batch(n: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"pixels_w": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
            "pixels_l": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
            "captions": ["a red square", "a blue circle"][:n], "size": n}


def _perturb(trainer) -> None:
    """Move the policy away from the reference the same way in every trainer (else the loss is log 2)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trainer.unwrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * 0.02)


def _step(trainer) -> tuple[dict, torch.Tensor]:
    """Loss, metrics and the gradient of all trainable weights (flattened) on the fixed batch."""
    from diffusion_po.training.trainer import _metric_floats

    _perturb(trainer)
    loss, metrics = trainer.method.compute_loss(trainer.context, _batch())
    trainer.accelerator.backward(loss)
    grads = [p.grad.detach().float().flatten() for p in trainer.unwrapped.parameters() if p.requires_grad]
    return _metric_floats(metrics), torch.cat(grads)


def _assert_close_runs(a, b, rtol: float, atol: float, grad_tol: float = 1e-4) -> None:
    (ma, ga), (mb, gb) = a, b
    assert abs(ma["loss"] - 0.6931) > 1e-3  # the policy differs from the reference
    for k in ("loss", "model_diff", "ref_diff", "raw_model_loss", "ref_loss"):
        assert ma[k] == pytest.approx(mb[k], rel=rtol, abs=atol), k
    assert ga.shape == gb.shape and ga.norm() > 0
    assert (ga - gb).norm() / ga.norm() < grad_tol


def test_channels_last_and_inference_mode_reference(tmp_path, tiny_sd):
    plain = _step(_trainer(tmp_path, tiny_sd, "plain", **PLAIN))
    fast = _step(_trainer(tmp_path, tiny_sd, "fast", **{**PLAIN, "channels_last": True,
                                                        "reference_inference_mode": True}))
    _assert_close_runs(plain, fast, *TOL)


def test_lora_frozen_weights_in_bf16(tmp_path, tiny_sd):
    """bf16 frozen base weights under bf16 autocast: no further from fp32 than plain bf16 autocast is."""
    from accelerate.state import AcceleratorState

    m32, g32 = _step(_trainer(tmp_path, tiny_sd, "fp32", use_lora=True, **PLAIN))
    AcceleratorState._reset_state()
    plain = _trainer(tmp_path, tiny_sd, "plain", use_lora=True, mixed_precision="bf16", **PLAIN)
    fast = _trainer(tmp_path, tiny_sd, "fast", use_lora=True, mixed_precision="bf16",
                    **{**PLAIN, "frozen_weights_in_weight_dtype": True})
    frozen = [p for p in fast.unwrapped.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in fast.unwrapped.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in plain.unwrapped.parameters())
    (mp, gp), (mf, gf) = _step(plain), _step(fast)
    bf16_noise = (gp - g32).norm() / g32.norm()  # what bf16 autocast alone does to the gradient
    assert (gf - g32).norm() / g32.norm() < 1.5 * bf16_noise + 1e-3
    for k in ("loss", "raw_model_loss", "ref_loss"):
        assert abs(mf[k] - m32[k]) < 1.5 * abs(mp[k] - m32[k]) + 2e-3, k


def test_compiled_blocks_keep_the_loss(tmp_path, tiny_sd):
    """Regional compilation (aot_eager here: dynamo capture and AOT autograd, without code generation)."""
    plain = _step(_trainer(tmp_path, tiny_sd, "plain", **PLAIN))
    trainer = _trainer(tmp_path, tiny_sd, "fast", **{**PLAIN, "compile": "blocks", "compile_backend": "aot_eager"})
    assert trainer.compiled.startswith("blocks: ") and int(trainer.compiled.split()[1]) >= 2
    _assert_close_runs(plain, _step(trainer), *TOL)


@pytest.mark.slow
def test_compiled_lora_reference_through_disabled_adapters(tmp_path, tiny_sd):
    plain = _step(_trainer(tmp_path, tiny_sd, "plain", use_lora=True, **PLAIN))
    fast = _step(_trainer(tmp_path, tiny_sd, "fast", use_lora=True,
                          **{**PLAIN, "compile": "blocks", "compile_backend": "aot_eager",
                             "reference_inference_mode": True, "channels_last": True}))
    _assert_close_runs(plain, fast, *TOL)


def test_lora_reference_is_the_base_network(tmp_path, tiny_sd):
    """The LoRA reference (adapters switched off) computes the pretrained network; the policy the adapted one."""
    from diffusers import UNet2DConditionModel

    trainer = _trainer(tmp_path, tiny_sd, "lora", use_lora=True, **PLAIN)
    _perturb(trainer)
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 800])
    cond = {"prompt_embeds": torch.randn(2, 77, 32, generator=g)}
    ctx = trainer.context
    with torch.no_grad():
        expected = base(x, t, cond["prompt_embeds"]).sample
        policy_before = ctx.policy_predict(x, t, cond)
    reference = ctx.reference_predict(x, t, cond)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    assert (policy_before - expected).abs().max() > 1e-3
    with torch.no_grad():  # adapters are back on afterwards
        torch.testing.assert_close(ctx.policy_predict(x, t, cond), policy_before)
    assert all(p.requires_grad for n, p in trainer.unwrapped.named_parameters() if "lora" in n)


@pytest.mark.slow
def test_inductor_compiled_blocks_keep_the_loss(tmp_path, tiny_sd):
    """The real backend (C++ code generation on the CPU; a minute or more)."""
    torch.set_num_threads(1)
    plain = _step(_trainer(tmp_path, tiny_sd, "plain", **PLAIN))
    fast = _step(_trainer(tmp_path, tiny_sd, "fast", **{**PLAIN, "compile": "blocks", "channels_last": True,
                                                        "reference_inference_mode": True}))
    rtol, atol, grad_tol = TOL
    _assert_close_runs(plain, fast, max(rtol, 1e-3), max(atol, 1e-5), max(grad_tol, 1e-3))


def test_auto_switches_are_off_on_the_cpu(tmp_path, tiny_sd):
    trainer = _trainer(tmp_path, tiny_sd, "auto")
    assert trainer.compiled == "none" and not trainer.channels_last
    trainer = _trainer(tmp_path, tiny_sd, "cl", channels_last=True)
    snapshot = trainer.context.speed_up(copy.deepcopy(trainer.unwrapped))  # e.g. a DRO sampling snapshot
    conv = snapshot.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_unknown_compile_blocks_is_a_clear_error(tmp_path, tiny_sd):
    from diffusion_po.errors import UserError

    with pytest.raises(UserError, match="found no NoSuchBlock"):
        _trainer(tmp_path, tiny_sd, "bad", compile="blocks", compile_blocks=["NoSuchBlock"])


def test_metric_floats_one_copy():
    from diffusion_po.training.trainer import _metric_floats

    out = _metric_floats({"loss": torch.tensor(0.5), "acc": torch.tensor([1.0]), "n": 3, "lr": 1e-4})
    assert out == {"loss": 0.5, "acc": 1.0, "n": 3.0, "lr": 1e-4}
    assert list(out) == ["loss", "acc", "n", "lr"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_prefetcher_moves_batches():
    from diffusion_po.training.trainer import DevicePrefetcher

    batches = [{"x": torch.full((2,), float(i)).pin_memory(), "t": {"c": torch.ones(1)}, "s": ["a"],
                "original_sizes": torch.ones(1, 2)} for i in range(3)]
    out = list(DevicePrefetcher(batches, torch.device("cuda")))
    assert [b["x"].device.type for b in out] == ["cuda"] * 3 and out[1]["t"]["c"].is_cuda
    assert [float(b["x"][0]) for b in out] == [0.0, 1.0, 2.0] and out[0]["s"] == ["a"]
    assert not out[0]["original_sizes"].is_cuda


@pytest.mark.parametrize("asynchronous", [False, True])
def test_channels_last_checkpoints_save_and_resume(tmp_path, tiny_sd, asynchronous):
    """Channels-last weights are not contiguous (safetensors refuses such tensors): checkpoints (also written
    from the host copy), resume and the final diffusers folder still restore them exactly, in channels-last,
    and the optimizer's moments too."""
    from diffusers import UNet2DConditionModel

    keys = {**PLAIN, "channels_last": True, "async_checkpointing": asynchronous}
    trainer = _trainer(tmp_path, tiny_sd, "out", **keys)
    (tmp_path / "out").mkdir()
    assert trainer.unwrapped.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.train_step(_batch())
    trainer.state.step = 1
    folder = trainer.save_checkpoint()
    trainer.wait_for_checkpoint()
    trainer.save_final()
    trained = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").state_dict()
    in_checkpoint = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()  # its loadable copy
    resumed = _trainer(tmp_path, tiny_sd, "out", **keys)
    resumed.accelerator.load_state(str(folder))
    for k, v in resumed.unwrapped.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
        torch.testing.assert_close(saved[k], trained[k], rtol=0, atol=0)
        torch.testing.assert_close(in_checkpoint[k], trained[k], rtol=0, atol=0)
    assert resumed.unwrapped.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    moments = resumed.optimizer.state_dict()["state"]
    conv = next(i for i, p in enumerate(resumed.optimizer.param_groups[0]["params"]) if p.dim() == 4)
    assert moments[conv]["exp_avg"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host copies of CUDA tensors")
def test_channels_last_host_copy_on_cuda_precedes_later_updates():
    """The asynchronous checkpoint's host copy: pinned, channels-last strides kept, queued on the stream
    without the host waiting, and ordered before an in-place update issued right after it."""
    from diffusion_po.training.async_checkpoint import HostCopier

    weight = torch.randn(64, 32, 3, 3, device="cuda").contiguous(memory_format=torch.channels_last)
    moments = {"step": torch.tensor(3.0, device="cuda"), "exp_avg": torch.randn(4096, 1024, device="cuda")}
    expected = (weight.cpu(), moments["exp_avg"].cpu())
    copier = HostCopier()
    copier.begin()
    out = copier.copy({"w": weight, "opt": moments})
    events = copier.done()
    weight.mul_(0.0)  # the next optimizer step, queued behind the copies
    moments["exp_avg"].add_(1.0)
    for event in events:
        event.synchronize()
    assert out["w"].is_pinned() and out["w"].stride() == weight.stride()
    assert torch.equal(out["w"], expected[0]) and torch.equal(out["opt"]["exp_avg"], expected[1])
    assert float(out["opt"]["step"]) == 3.0
