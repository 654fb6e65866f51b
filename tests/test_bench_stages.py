"""`diffusion-po bench gpu`: stages in their own processes under time caps, a failing or slow stage recorded
while the others run, the kernel-profile summary, the SDPA micro-benchmark, and the CPU dry run end to end."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from diffusion_po.bench.stages import (
    DEFAULT_STAGES,
    MIN_START_S,
    SUMMARY_RESERVE_S,
    GpuBenchOptions,
    Stage,
    run_gpu_bench,
)
from diffusion_po.cli import main


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
    torch.set_num_threads(threads)


def _read(path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- the driver
def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_crashed_or_timed_out_stage_is_recorded_and_the_next_still_runs(tmp_path, capsys):
    out = tmp_path / "out"
    partial_then_hang = ("import sys, time; from pathlib import Path; from diffusion_po.bench.stages import write_json; "
                         f"write_json(Path({str(out)!r}) / 'slow.json', {{'status': 'partial', 'result': {{'x': 1}}}}); "
                         "print('measured x', flush=True); time.sleep(120)")
    stages = [
        Stage("crash", _python("print('boom', flush=True); raise SystemExit(3)"), cap_s=60),
        Stage("slow", _python(partial_then_hang), cap_s=30),  # room to import torch on a loaded machine
        Stage("sdpa", [sys.executable, "-m", "diffusion_po.bench.stages", "sdpa", "--out", str(out), "--size", "tiny",
                       "--device", "cpu", "--steps", "1", "--warmup", "1"], cap_s=120),
    ]
    t0 = time.perf_counter()
    rc = run_gpu_bench(GpuBenchOptions(out=out, budget_s=600, size="tiny", device="cpu"), stages=stages)
    assert rc == 1
    assert time.perf_counter() - t0 < 110  # the hanging stage was ended at its cap, not waited for
    crash = _read(out / "crash.json")
    assert crash["status"] == "crashed" and crash["exit"] == 3 and "boom" in crash["log_tail"]
    slow = _read(out / "slow.json")
    assert slow["status"] == "timeout" and "time cap of 30 s" in slow["error"]
    assert slow["result"] == {"x": 1}  # what it measured before the cap is kept
    sdpa = _read(out / "sdpa.json")
    assert sdpa["status"] == "ok" and set(sdpa["result"]["shapes"]) == {"sd15-d40", "sd15-d80", "sd15-d160", "sdxl-d64"}
    summary = _read(out / "summary.json")
    assert summary["not_finished"] == ["crash", "slow"] and summary["pending"] == []
    assert summary["stages"]["sdpa"]["status"] == "ok" and "| crash | crashed |" in summary["markdown"]
    log = capsys.readouterr().out
    assert "[bench gpu] slow: start" in log and "[bench gpu] slow: end, timeout" in log
    assert "  [slow] measured x" in log and "not finished: crash, slow" in log


def test_stages_past_the_budget_are_skipped_and_recorded(tmp_path):
    out = tmp_path / "out"
    budget = MIN_START_S + SUMMARY_RESERVE_S - 1
    stages = [Stage("never", _python("raise SystemExit('must not run')"), cap_s=60)]
    assert run_gpu_bench(GpuBenchOptions(out=out, budget_s=budget, size="tiny", device="cpu"), stages=stages) == 1
    assert _read(out / "never.json")["status"] == "skipped"
    assert _read(out / "summary.json")["not_finished"] == ["never"]


def test_bench_gpu_bad_arguments(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["bench", "gpu", "--out", out, "--size", "tiny", "--device", "cpu", "--stages", "env,nope"]) == 2
    assert "unknown stage(s) nope" in capsys.readouterr().err
    assert main(["bench", "gpu", "--out", out, "--size", "tiny", "--device", "cpu", "--cap", "sdpa=soon"]) == 2
    assert "STAGE=SECONDS" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "gpu", "--out", out, "--device", "cpu"]) == 2
        assert "--size full needs a GPU" in capsys.readouterr().err


def test_summary_reports_cold_and_warm_first_step_compile_errors_and_the_sdxl_choice(tmp_path):
    from diffusion_po.bench.stages import headline, write_json

    counters = {"graphs": 9, "graph_breaks": 0, "recompiles": 0, "fxgraph_cache_hit": 0, "fxgraph_cache_miss": 18,
                "aot_autograd_cache_hit": 0, "aot_autograd_cache_miss": 9}
    cold = {"ours": {"time_to_first_step_s": 71.5, "compiled": "failed (BackendCompilerFailed: x); running eager",
                     "compile_error": "BackendCompilerFailed: x", "compile_counters": counters,
                     "peak_gib": 40.25, "peak_reserved_gib": 44.5, "pairs_per_s": 60.0}, "ratios": {"speedup_vs_recipe": 2.6}}
    warm_counters = counters | {"fxgraph_cache_hit": 18, "fxgraph_cache_miss": 0}
    warm = {"ours": {"time_to_first_step_s": 12.0, "compile_counters": warm_counters}}
    sdxl = {"ours_checkpointing": {"peak_gib": 20.0, "peak_reserved_gib": 22.0, "pairs_per_s": 1.0},
            "ours_no_checkpointing": {"error": "out of memory"},
            "checkpointing_choice": {"gradient_checkpointing": True, "reason": "without checkpointing: out of memory"}}
    for name, result in (("sd15-dpo-full-cold", cold), ("sd15-dpo-full-warm", warm), ("sdxl-dpo-lora", sdxl)):
        write_json(tmp_path / f"{name}.json", {"status": "ok", "result": result})
    rows = {r["figure"]: r["value"] for r in headline(tmp_path)}
    assert rows["SD1.5 full: time to first step, cold"] == 71.5
    assert rows["SD1.5 full: time to first step, warm (compile cache)"] == 12.0
    assert rows["SD1.5 full DPO: compile error"] == "BackendCompilerFailed: x"
    assert rows["SD1.5 full DPO: ours training peak allocated / reserved, GiB"] == "40.2 / 44.5"
    assert "FX cache hit/miss 18/0" in rows["SD1.5 full: compile counters, warm (compile cache)"]
    assert rows["SDXL LoRA DPO: without checkpointing, peak allocated / reserved GiB, pairs/s"] == "out of memory"
    assert rows["SDXL LoRA DPO: chosen"].startswith("with checkpointing")
    assert not any(r.startswith(("device", "SD1.5 LoRA")) for r in rows)  # stages without a file are left out


# ----------------------------------------------------------------------------- what the stages measure
def test_profile_summary_of_a_synthetic_kernel_list():
    from diffusion_po.bench.measure import kernel_category, summarize_kernels

    kernels = [  # two streams overlap from 50 to 60 us; a gap from 100 to 150 us
        {"name": "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", "start_us": 0, "dur_us": 60},
        {"name": "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "start_us": 50, "dur_us": 30},
        {"name": "nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_NNT", "start_us": 80, "dur_us": 20},
        {"name": "triton_per_fused_native_group_norm_0", "start_us": 150, "dur_us": 10},
        {"name": "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "start_us": 160, "dur_us": 20},
        {"name": "Memcpy HtoD (Pageable -> Device)", "start_us": 180, "dur_us": 5},
        {"name": "void at::native::elementwise_kernel<128, 4>", "start_us": 185, "dur_us": 15},
    ]
    s = summarize_kernels(kernels, window_us=400.0, steps=2)
    busy_us = 100 + 50  # [0, 100] and [150, 200]
    assert s["busy_fraction"] == pytest.approx(busy_us / 400.0)
    assert s["kernels_per_step"] == 3.5 and s["window_ms_per_step"] == pytest.approx(0.2)
    ms = s["ms_per_step"]
    assert ms["attention"] == pytest.approx(0.030) and ms["conv"] == pytest.approx(0.015)
    assert ms["gemm"] == pytest.approx(0.010) and ms["triton"] == pytest.approx(0.005)
    assert ms["optimizer"] == pytest.approx(0.010) and ms["memcpy"] == pytest.approx(0.0025)
    assert ms["other"] == pytest.approx(0.0075)
    assert s["kernel_ms_per_step"] == pytest.approx(sum(ms.values()))
    assert sum(s["share"].values()) == pytest.approx(1.0)
    assert s["top"][0]["category"] == "attention" and s["top"][0]["ms_per_step"] == pytest.approx(0.030)
    for name, category in [("cutlass3x_sm90_tensorop_gemm_bf16", "gemm"), ("aten::addmm", "gemm"),
                           ("aten::mkldnn_convolution", "conv"), ("cudnn_generated_fort_native_sdpa_sm90", "attention"),
                           ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
                           ("aten::_fused_adamw_", "optimizer"), ("aten::gelu", "other")]:
        assert kernel_category(name) == category, name
    assert summarize_kernels([], window_us=10.0)["busy_fraction"] == 0.0


def test_kernel_profile_of_a_cpu_step():
    from diffusion_po.bench.measure import kernel_profile

    conv = torch.nn.Conv2d(4, 8, 3)
    x = torch.randn(2, 4, 16, 16)
    s = kernel_profile(lambda: conv(x).sum().backward(), torch.device("cpu"), steps=2)
    assert s["source"].startswith("cpu") and s["steps"] == 2 and s["ms_per_step"]["conv"] > 0
    assert 0 < s["busy_fraction"] <= 1


def test_sdpa_bench_on_the_cpu_at_a_tiny_shape():
    from diffusion_po.bench.sdpa import BACKENDS, sdpa_bench

    r = sdpa_bench(torch.device("cpu"), "tiny", steps=1, warmup=1)
    assert r["dtype"] == "float32" and [row["head_dim"] for row in r["shapes"].values()] == [40, 80, 160, 64]
    for row in r["shapes"].values():
        assert set(BACKENDS) <= set(row)
        default = row["default"]
        assert default["fwd_ms"] > 0 and default["fwd_bwd_ms"] > 0 and default["rel_err"] < 1e-5
        assert "error" in row["cudnn"]  # no cuDNN attention on the CPU: recorded, not raised
        assert row["fastest_fwd_bwd"] in BACKENDS


def test_sdxl_checkpointing_rule():
    from diffusion_po.bench.runner import ROOM_MARGIN, choose_checkpointing

    assert choose_checkpointing({"peak_reserved_gib": 60.0}, 139.0)["gradient_checkpointing"] is False
    tight = choose_checkpointing({"peak_reserved_gib": (1 - ROOM_MARGIN / 2) * 80.0}, 80.0)
    assert tight["gradient_checkpointing"] is True and "does not leave" in tight["reason"]
    assert choose_checkpointing({"error": "out of memory"}, 24.0)["gradient_checkpointing"] is True
    assert choose_checkpointing({"peak_reserved_gib": None}, None)["gradient_checkpointing"] is False


def _tiny_sd15(s):
    from diffusion_po.bench.models import build_pipeline
    from diffusion_po.bench.runner import _cond_shapes
    from diffusion_po.families import family_for_pipeline

    pipe = build_pipeline("sd15", "tiny", network_device="cpu")
    return pipe, _cond_shapes(family_for_pipeline(pipe))


def test_our_row_resets_the_peak_after_set_up_and_reports_compile_counters(monkeypatch):
    from diffusion_po.bench import runner

    s = runner.Settings(size="tiny", device="cpu", steps=1, warmup=1).resolved()
    pipe, cond = _tiny_sd15(s)
    events: list[str] = []
    build = runner._our_trainer

    def recording_trainer(*args, **kwargs):
        trainer = build(*args, **kwargs)
        events.append("set-up")
        step = trainer.train_step
        trainer.train_step = lambda batch: (events.append("step"), step(batch))[1]
        return trainer

    monkeypatch.setattr(runner, "_our_trainer", recording_trainer)
    monkeypatch.setattr(runner, "reset_peak", lambda dev: events.append("reset"))
    out = runner._ours(pipe, "sd15", s, torch.device("cpu"), 2, False, False, cond)
    assert events[:3] == ["set-up", "reset", "step"] and events.count("reset") == 1
    assert {"peak_gib", "peak_reserved_gib", "compile_error"} <= set(out) and out["compile_error"] is None
    assert {"graphs", "graph_breaks", "fxgraph_cache_hit", "aot_autograd_cache_hit"} <= set(out["compile_counters"])


def test_a_failed_compile_is_in_the_benchmark_json(monkeypatch):
    """Under `compile: auto` (GPU) a failing compile runs eager and our row says so; asked for explicitly
    (`compile: blocks`) it is the row's error."""
    import torch._dynamo as dynamo
    from torch._dynamo import register_backend

    from diffusion_po.bench import runner

    def broken_backend(gm, example_inputs):
        raise RuntimeError("bench backend always fails")

    register_backend(name="bench_test_broken", compiler_fn=broken_backend)
    dynamo.reset()
    keys = {"compile": "blocks", "compile_backend": "bench_test_broken"}
    s = runner.Settings(size="tiny", device="cpu", steps=1, warmup=1, overrides=keys).resolved()
    pipe, cond = _tiny_sd15(s)
    explicit = runner._safe(runner._ours, pipe, "sd15", s, torch.device("cpu"), 2, False, False, cond)
    assert "bench backend always fails" in explicit["error"]

    build = runner._our_trainer

    def as_under_auto(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer._compile_fallback_pending = True  # what `compile: auto` sets on a GPU
        return trainer

    monkeypatch.setattr(runner, "_our_trainer", as_under_auto)
    dynamo.reset()
    pipe, cond = _tiny_sd15(s)
    auto = runner._ours(pipe, "sd15", s, torch.device("cpu"), 2, False, False, cond)
    assert auto["pairs_per_s"] > 0 and auto["compiled"].startswith("failed (")
    assert "bench backend always fails" in auto["compile_error"]
    dynamo.reset()


# ----------------------------------------------------------------------------- the whole command, CPU
@pytest.mark.slow
def test_bench_gpu_dry_run_end_to_end_on_the_cpu(tmp_path, capsys):
    """Every stage in its own process at tiny size on the CPU (~1.5 min on 2 shared cores)."""
    out = tmp_path / "out"
    assert main(["bench", "gpu", "--size", "tiny", "--device", "cpu", "--out", str(out), "--budget-s", "900"]) == 0
    results = {name: _read(out / f"{name}.json") for name in DEFAULT_STAGES}
    assert all(r["status"] == "ok" for r in results.values()), {n: r.get("error") for n, r in results.items()}
    env = results["env"]["result"]
    assert env["matmul_peak"]["tflops"] > 0 and torch.__version__.startswith(env["packages"]["torch"])
    corr = results["correctness"]["result"]
    assert corr["passed"] and set(corr["steps"]) == {f"{f}-{k}" for f in ("sd", "sdxl", "sd3") for k in ("full", "lora")}
    assert all(abs(corr["steps"][f"{f}-lora"]["loss_minus_log2"]) < 1e-4 for f in ("sd", "sdxl", "sd3"))
    assert corr["sync"]["counted"] is False  # CUDA only
    cold, warm = results["sd15-dpo-full-cold"]["result"], results["sd15-dpo-full-warm"]["result"]
    assert cold["ratios"]["speedup_vs_recipe"] > 0 and "recipe_p2_encoders" in cold
    assert cold["ours"]["profile"]["kernels_per_step"] > 0 and "compile_counters" in cold["ours"]
    assert "recipe_p2_encoders" not in warm and warm["ours"]["time_to_first_step_s"] > 0
    assert warm["compile_cache_dir"] == cold["compile_cache_dir"]
    sdxl = results["sdxl-dpo-lora"]["result"]
    assert "error" not in sdxl["ours_checkpointing"] and "error" not in sdxl["ours_no_checkpointing"]
    assert sdxl["ours_checkpointing"]["gradient_checkpointing"] is True
    assert sdxl["checkpointing_choice"]["gradient_checkpointing"] is False and "recipe_p1_cached" in sdxl
    summary = _read(out / "summary.json")
    assert summary["not_finished"] == [] and list(summary["stages"]) == list(DEFAULT_STAGES)
    figures = {row["figure"]: row["value"] for row in summary["headline"]}
    assert figures["SD1.5 full: time to first step, cold"] == cold["ours"]["time_to_first_step_s"]
    assert figures["SD1.5 full: time to first step, warm (compile cache)"] == warm["ours"]["time_to_first_step_s"]
    log = capsys.readouterr().out
    assert f"[bench gpu] all {len(DEFAULT_STAGES)} stages finished" in log
    assert "| figure | value | target |" in log and all(f"[bench gpu] {n}: end, ok" in log for n in DEFAULT_STAGES)
