"""`diffusion-po bench` at tiny size on the CPU, its FLOP accounting and its reference recipe."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_po.cli import main


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """A clean accelerate state, and one thread (timings on a shared CPU; restored after)."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
    torch.set_num_threads(threads)


def _bench(tmp_path, cases: str, *extra: str) -> dict:
    path = tmp_path / "bench.json"
    assert main(["bench", "--size", "tiny", "--cases", cases, "--json", str(path), "--steps", "1",
                 "--warmup", "1", *extra]) == 0
    return json.loads(path.read_text())


def _check_train_case(r: dict, lora: bool) -> None:
    ours = r["ours"]
    assert "error" not in ours, ours.get("traceback")
    assert ours["pairs"] == 2 and ours["pairs_per_s"] > 0 and ours["step_ms"] > 0
    assert ours["compiled"] == "none" and ours["peak_gib"] is None  # CPU: no compile, no GPU memory
    assert r["model_gflop_per_pair"] == pytest.approx((6 if lora else 8) * r["forward_gflop_per_image"])
    recipes = [k for k in r if k.startswith("recipe_")]
    assert recipes and all("error" not in r[k] for k in recipes), [r[k].get("traceback") for k in recipes]
    assert "recipe_p2_encoders" in r and "recipe_p2_cached" in r
    assert r["ratios"]["speedup_vs_recipe"] == pytest.approx(
        ours["pairs_per_s"] / r["recipe_p2_encoders"]["pairs_per_s"])
    for key in ["ours", *recipes]:
        assert 0 < r[key]["mfu"] < 1


def test_bench_training_cases(tmp_path, capsys):
    report = _bench(tmp_path, "sd15-dpo-full,sd15-dpo-lora")
    assert report["size"] == "tiny" and report["matmul_peak"]["tflops"] > 0
    assert report["environment"]["device"].startswith("cpu")
    _check_train_case(report["cases"]["sd15-dpo-full"], lora=False)
    _check_train_case(report["cases"]["sd15-dpo-lora"], lora=True)
    out = capsys.readouterr().out
    assert "ours (trainer, cached)" in out and "recipe p2 encoders" in out and "speedup_vs_recipe" in out
    checks = report["cases"]["sd15-dpo-full"]["checks"]
    assert checks["first_step_s"]["target"] == 90.0 and checks["memory_vs_recipe_same_pairs"]["ok"] is None


def test_bench_sampling_and_online_cases(tmp_path, capsys):
    report = _bench(tmp_path, "sd15-sampling,sd15-dro", "--no-reference")
    s = report["cases"]["sd15-sampling"]
    for key in ("stock", "ours_eager", "ours"):
        assert s[key]["images_per_s"] > 0, s[key]
    assert set(s["step_ms_eager"]) == {"cfg", "perp-neg", "npo-lora"} and s["step_ms_eager"]["cfg"]["x_cfg"] == 1.0
    assert set(s["step_ms"]) == {"cfg", "perp-neg"}
    assert s["ratios"]["perp_neg_vs_cfg_step"] == s["step_ms"]["perp-neg"]["x_cfg"]
    assert s["ratios"]["speedup_vs_stock"] == pytest.approx(s["ours"]["images_per_s"] / s["stock"]["images_per_s"])
    d = report["cases"]["sd15-dro"]["ours"]
    assert "error" not in d, d.get("traceback")
    assert d["fills"] == d["calls"] == 2  # buffer_sample_steps 1: every step samples
    assert 0 < d["sampling_fraction"] < 1 and d["sampler_steps"] == 20
    out = capsys.readouterr().out
    assert "stock" in out and "per step" in out and "DRO:" in out


@pytest.mark.slow
def test_bench_sdxl_and_sd3_cases(tmp_path):
    report = _bench(tmp_path, "sdxl-dpo-full,sdxl-dpo-lora,sd3-dpo-lora")
    for name, lora in (("sdxl-dpo-full", False), ("sdxl-dpo-lora", True), ("sd3-dpo-lora", True)):
        r = report["cases"][name]
        assert "error" not in r["ours"], r["ours"].get("traceback")
        assert r["model_gflop_per_pair"] == pytest.approx((6 if lora else 8) * r["forward_gflop_per_image"])
        recipe = [k for k in r if k.startswith("recipe_")]
        assert recipe == [f"recipe_p{r['ours']['pairs']}_cached"] and "error" not in r[recipe[0]]


def test_bench_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--cases", "nope", "--json", str(tmp_path / "x.json")]) == 2
    assert "unknown case(s) nope" in capsys.readouterr().err
    assert main(["bench", "--set", "data.format=pickapic"]) == 2
    assert "top-level" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2


def test_sd15_size_forward_flops_match_the_issue():
    """SD1.5's UNet at 64x64 latents: ~806 GFLOP per image forward (780 TFLOP/s / 121 pairs/s / 8)."""
    from diffusion_po.bench.measure import count_flops
    from diffusion_po.bench.models import sd15_unet

    with torch.device("meta"):
        unet = sd15_unet()
        x, emb, t = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768), torch.tensor([500.0])
    with torch.no_grad():
        gflop = count_flops(lambda: unet(x, t, emb)) / 1e9
    assert gflop == pytest.approx(780e3 / 121 / 8, rel=0.03)


def test_reference_loss_is_our_dpo_loss():
    """The recipe's loss on (pred, ref_pred, target) equals our Diffusion-DPO loss on the per-sample errors."""
    from diffusion_po.bench.reference import dpo_loss
    from diffusion_po.families import per_sample_error
    from diffusion_po.objectives.dpo import loss

    g = torch.Generator().manual_seed(0)
    pred, ref, target = (torch.randn(6, 4, 8, 8, generator=g) for _ in range(3))
    err, ref_err = per_sample_error(pred, target), per_sample_error(ref, target)
    ours, _ = loss(err[:3], err[3:], ref_err[:3], ref_err[3:], beta=50.0)
    torch.testing.assert_close(dpo_loss(pred, ref, target, 50.0), ours)
    # and by hand for one pair: -log sigmoid(-beta/2 ((ew - el) - (rw - rl)))
    ew, el, rw, rl = err[0], err[3], ref_err[0], ref_err[3]
    manual = -torch.nn.functional.logsigmoid(-25.0 * ((ew - el) - (rw - rl)))
    one, _ = loss(err[:1], err[3:4], ref_err[:1], ref_err[3:4], beta=50.0)
    torch.testing.assert_close(one, manual)
