"""`diffusion-po bench gpu`: the prepared GPU measurement, as stages in priority order.

Each stage runs in its own process (`python -m diffusion_po.bench.stages STAGE ...`) under its own time
cap and writes `<out>/<stage>.json` when it finishes (and, for the training stages, after every
measured variant), so a run cut short keeps every finished stage; a stage that crashes or runs out of
time gets a JSON with the error and whatever it had measured, and the next stage still runs. After every
stage `<out>/summary.json` is rewritten with the headline figures; at the end they are printed as a
markdown table. The exit status is 0 only when every stage finished.

Stages (the default list, most important first):

- `env`: nvidia-smi, torch/CUDA/cuDNN and package versions, the device's memory, the measured matmul
  peak and copy bandwidth (the two ceilings);
- `correctness`: one DPO step per family (sd, sdxl, sd3) on the tiny models, full fine-tune and LoRA,
  in bf16 on the GPU (fp32 on the CPU): loss finite, LoRA step-0 loss = log 2; and one step under
  `torch.cuda.set_sync_debug_mode("warn")` counting the host synchronisations;
- `sdpa`: the attention backends at SD1.5's and SDXL's head dims (`bench/sdpa.py`);
- `sd15-dpo-full-cold`: the `sd15-dpo-full` case (ours against the recipe) with an empty compile cache,
  and a kernel profile of our step;
- `sd15-dpo-full-warm`: our path again in a new process from the cold stage's compile cache (warm
  start: time to first step, cache hits);
- `sd15-dpo-lora`, `sdxl-dpo-lora` (memory at 1 pair, with and without gradient checkpointing, and the
  choice between them).

Any other case of `diffusion-po bench` (`sdxl-dpo-full`, `sd15-sampling`, `sd15-dro`, `sd3-dpo-lora`)
can be added as a stage with `--stages`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusion_po.bench.runner import Settings

DEFAULT_STAGES = ("env", "correctness", "sdpa", "sd15-dpo-full-cold", "sd15-dpo-full-warm", "sd15-dpo-lora",
                  "sdxl-dpo-lora")
#: each stage's time cap, seconds, at full size (GPU) and tiny size (CPU dry run; the CPU imports slowly)
CAPS: dict[str, dict[str, float]] = {
    "env": {"full": 45, "tiny": 120},
    "correctness": {"full": 90, "tiny": 300},
    "sdpa": {"full": 60, "tiny": 120},
    "sd15-dpo-full-cold": {"full": 200, "tiny": 300},
    "sd15-dpo-full-warm": {"full": 100, "tiny": 300},
    "sd15-dpo-lora": {"full": 150, "tiny": 300},
    "sdxl-dpo-lora": {"full": 180, "tiny": 300},
}
OTHER_CAP = {"full": 180, "tiny": 300}
#: the training stages and the case of `diffusion-po bench` each one runs
STAGE_CASE = {"sd15-dpo-full-cold": "sd15-dpo-full", "sd15-dpo-full-warm": "sd15-dpo-full"}
MIN_START_S = 15.0
"""A stage is skipped when less than this is left of the budget."""
SUMMARY_RESERVE_S = 5.0
CAP_ENV = "DIFFUSION_PO_STAGE_CAP_S"
"""The driver tells a stage its time cap in this variable."""


def stage_names() -> list[str]:
    from diffusion_po.bench.cases import CASES

    return list(DEFAULT_STAGES) + [c for c in CASES if c not in STAGE_CASE.values() and c not in DEFAULT_STAGES]


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (a process killed while writing leaves the previous file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ============================================================================ inside a stage's process
@dataclasses.dataclass
class StageContext:
    """What one stage's process was asked to do, and where it writes."""
    name: str
    out: Path
    size: str = "full"
    device: str = "auto"
    steps: int = 0
    warmup: int = 0
    profile_steps: int = 3
    cap_s: float = 0.0
    compile_cache: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def path(self) -> Path:
        return self.out / f"{self.name}.json"

    def write(self, status: str, result: dict[str, Any], **extra: Any) -> None:
        write_json(self.path, {"stage": self.name, "status": status, "size": self.size, "cap_s": self.cap_s,
                               "wall_s": time.perf_counter() - self.started, "result": result, **extra})

    def settings(self, reference: bool = True, profile: bool = False) -> Settings:
        """The benchmark's settings for this stage (the compile cache shared by the stages of the run)."""
        from diffusion_po.bench.runner import Settings

        overrides = dict(self.overrides)
        if self.compile_cache:
            overrides.setdefault("compile_cache_dir", self.compile_cache)
        return Settings(size=self.size, device=self.device, steps=self.steps, warmup=self.warmup,
                        reference=reference, overrides=overrides,
                        profile_steps=self.profile_steps if profile else 0).resolved()

    def peak_tflops(self, device) -> float:
        """The env stage's measured matmul peak (same run), else measured here."""
        from diffusion_po.bench.measure import matmul_peak_tflops

        env = read_json(self.out / "env.json") or {}
        peak = (env.get("result") or {}).get("matmul_peak", {}).get("tflops")
        return float(peak) if peak else matmul_peak_tflops(device)["tflops"]


def _package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "triton", "numpy", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def stage_env(ctx: StageContext) -> dict[str, Any]:
    import torch

    from diffusion_po.bench.measure import copy_gbps, matmul_peak_tflops

    dev = torch.device(ctx.settings().device)
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "packages": _package_versions(), "torch_cuda": torch.version.cuda,
                            "device_type": dev.type}
    if shutil.which("nvidia-smi"):
        query = "name,memory.total,memory.used,driver_version,clocks.max.sm,power.limit,temperature.gpu"
        try:
            smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
                                 text=True, timeout=30)
            info["nvidia_smi"] = (smi.stdout or smi.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvidia_smi"] = f"error: {exc}"
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        info.update({"device": props.name, "capability": f"{props.major}.{props.minor}",
                     "sm_count": props.multi_processor_count, "memory_total_gib": total / 2**30,
                     "memory_free_gib": free / 2**30, "cudnn": torch.backends.cudnn.version()})
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    info["matmul_peak"] = matmul_peak_tflops(dev)
    info["copy_bandwidth"] = copy_gbps(dev)
    print(f"device: {info['device']}; matmul peak {info['matmul_peak']['tflops']:.4g} TFLOP/s "
          f"({info['matmul_peak']['dtype']}); copy {info['copy_bandwidth']['gbps']:.4g} GB/s", flush=True)
    return info


LOG2 = math.log(2.0)
LORA_LOG2_TOLERANCE = 1e-4


def stage_correctness(ctx: StageContext) -> dict[str, Any]:
    """One DPO step per family on the tiny models (eager: the training stages run the compiled path, and
    report a failing compile there), full fine-tune and LoRA; then the host synchronisations of a step."""
    import torch

    from diffusion_po.bench.models import FAMILY_OF, build_pipeline
    from diffusion_po.bench.runner import _cached_batch, _cond_shapes, _our_trainer
    from diffusion_po.families import family_for_pipeline

    base = ctx.settings()
    s = dataclasses.replace(base, size="tiny", overrides={"compile": "none"})
    dev = torch.device(s.device)
    result: dict[str, Any] = {"dtype": "bf16" if s.amp else "fp32", "device": str(dev), "steps": {}}

    def one_step(model: str, lora: bool):
        pipe = build_pipeline(model, "tiny", network_device=dev)
        cond = _cond_shapes(family_for_pipeline(pipe))
        trainer = _our_trainer(pipe, model, s, 2, lora, False)
        batch = _cached_batch(trainer.family, cond, 2, True, trainer.cfg.resolution, dev)
        return trainer, batch

    ok = True
    for model in ("sd15", "sdxl", "sd3"):
        for lora in (False, True):
            key = f"{FAMILY_OF[model]}-{'lora' if lora else 'full'}"
            try:
                trainer, batch = one_step(model, lora)
                finite, metrics = trainer.train_step(batch)
                loss = float(metrics.get("loss", float("nan")))
                row: dict[str, Any] = {"finite": bool(finite), "loss": loss, "ok": bool(finite) and math.isfinite(loss)}
                if lora:
                    row["loss_minus_log2"] = loss - LOG2
                    row["ok"] = row["ok"] and abs(loss - LOG2) <= LORA_LOG2_TOLERANCE
            except Exception as exc:
                row = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400],
                       "traceback": traceback.format_exc()[-1500:]}
            ok = ok and row["ok"]
            result["steps"][key] = row
            print(f"{key}: {'ok' if row['ok'] else 'FAIL'} {row.get('loss', row.get('error'))}", flush=True)
            ctx.write("partial", result)
    result["sync"] = _sync_count(one_step, dev)
    result["passed"] = ok
    result["lora_log2_tolerance"] = LORA_LOG2_TOLERANCE
    return result


def _sync_count(one_step: Callable, dev) -> dict[str, Any]:
    """Host synchronisations of one training step (after a first one), by CUDA's sync debug mode."""
    import warnings

    import torch

    if dev.type != "cuda":
        return {"counted": False, "reason": "CUDA's sync debug mode needs a GPU (tests/test_step_sync.py "
                                            "counts the host reads on the CPU)"}
    try:
        trainer, batch = one_step("sd15", False)
        trainer.train_step(batch)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train_step(batch)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
        return {"counted": True, "sync_warnings": len(syncs), "where": dict(where.most_common(10)),
                "ok": len(syncs) <= 1, "expected": "<= 1 (the deferred metrics read of the optimizer step)"}
    except Exception as exc:
        return {"counted": False, "error": f"{type(exc).__name__}: {exc}"[:400]}


def stage_sdpa(ctx: StageContext) -> dict[str, Any]:
    import torch

    from diffusion_po.bench.sdpa import sdpa_bench

    s = ctx.settings()
    result = sdpa_bench(torch.device(s.device), s.size, steps=s.steps, warmup=s.warmup)
    for label, row in result["shapes"].items():
        cells = ", ".join(f"{b} {v['fwd_bwd_ms']:.3f} ms" if "fwd_bwd_ms" in v else f"{b} n/a"
                          for b, v in row.items() if isinstance(v, dict))
        print(f"{label}: fwd+bwd {cells}", flush=True)
    return result


def stage_case(ctx: StageContext, case: str, reference: bool = True, profile: bool = False) -> dict[str, Any]:
    """A case of `diffusion-po bench` (training: ours against the recipe; sampling; DRO)."""
    import torch

    from diffusion_po.bench.runner import CASES, KINDS, format_case, train_case

    s = ctx.settings(reference=reference, profile=profile)
    dev = torch.device(s.device)
    spec = CASES[case]
    peak = ctx.peak_tflops(dev)
    cache = Path(s.overrides["compile_cache_dir"]) if "compile_cache_dir" in s.overrides else None
    files_before = sum(1 for p in cache.rglob("*") if p.is_file()) if cache and cache.exists() else 0

    def partial(result: dict[str, Any]) -> None:
        ctx.write("partial", {"case": case, **result})

    if spec["kind"] == "train":
        result = train_case(case, spec, s, peak, partial=partial)
    else:
        result = KINDS[spec["kind"]](case, spec, s, peak)
    result = {"case": case, "kind": spec["kind"], "reference": reference, "compile_cache_dir": str(cache),
              "compile_cache_files_before": files_before,
              "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "matmul_peak_tflops": peak, **result}
    print(format_case(case, result), flush=True)
    return result


def run_stage(ctx: StageContext) -> int:
    """Run one stage in this process and write its JSON. Returns the exit status."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    ctx.out.mkdir(parents=True, exist_ok=True)
    try:
        if ctx.name == "env":
            result = stage_env(ctx)
        elif ctx.name == "correctness":
            result = stage_correctness(ctx)
        elif ctx.name == "sdpa":
            result = stage_sdpa(ctx)
        elif ctx.name == "sd15-dpo-full-cold":
            result = stage_case(ctx, "sd15-dpo-full", reference=True, profile=True)
        elif ctx.name == "sd15-dpo-full-warm":
            result = stage_case(ctx, "sd15-dpo-full", reference=False)
        else:
            result = stage_case(ctx, ctx.name)
    except Exception as exc:
        previous = (read_json(ctx.path) or {}).get("result", {})
        ctx.write("error", previous, error=f"{type(exc).__name__}: {exc}"[:600],
                  traceback=traceback.format_exc()[-3000:])
        traceback.print_exc()
        return 1
    ctx.write("ok", result)
    return 0


def _stage_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffusion_po.bench.stages", description="one stage of bench gpu")
    p.add_argument("stage")
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="full", choices=["tiny", "full"])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--cap-s", type=float, default=float(os.environ.get(CAP_ENV, 0) or 0),
                   help="the time cap the driver gives this stage (recorded; the driver enforces it)")
    p.add_argument("--compile-cache", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    return p


def stage_main(argv: list[str] | None = None) -> int:
    from diffusion_po.config import parse_override

    args = _stage_parser().parse_args(argv)
    ctx = StageContext(name=args.stage, out=Path(args.out), size=args.size, device=args.device, steps=args.steps,
                       warmup=args.warmup, profile_steps=args.profile_steps, cap_s=args.cap_s,
                       compile_cache=args.compile_cache,
                       overrides=dict(parse_override(text) for text in args.overrides))
    return run_stage(ctx)


# ============================================================================ the driver
@dataclasses.dataclass
class Stage:
    """A stage as the driver runs it: a command, a time cap."""
    name: str
    command: list[str]
    cap_s: float


@dataclasses.dataclass
class GpuBenchOptions:
    out: Path
    budget_s: float = 480.0
    size: str = "full"
    device: str = "auto"
    stages: tuple[str, ...] = DEFAULT_STAGES
    steps: int = 0
    warmup: int = 0
    profile_steps: int = 3
    caps: dict[str, float] = dataclasses.field(default_factory=dict)
    compile_cache: str | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)


def build_stages(opts: GpuBenchOptions, compile_cache: str) -> list[Stage]:
    stages = []
    for name in opts.stages:
        cap = opts.caps.get(name, CAPS.get(name, OTHER_CAP)[opts.size])
        command = [sys.executable, "-m", "diffusion_po.bench.stages", name, "--out", str(opts.out),
                   "--size", opts.size, "--device", opts.device, "--steps", str(opts.steps),
                   "--warmup", str(opts.warmup), "--profile-steps", str(opts.profile_steps),
                   "--compile-cache", compile_cache]
        for text in opts.overrides:
            command += ["--set", text]
        stages.append(Stage(name, command, float(cap)))
    return stages


class _Child:
    """The stage process in flight, so a signal to the driver ends it too."""
    proc: subprocess.Popen | None = None


def _kill(proc: subprocess.Popen) -> None:
    """End the stage's process group (its compile workers included): TERM, then KILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _stage_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the benchmark's own compile cache: the cold stage is cold, the warm stage reads what it wrote
    for key in ("TORCHINDUCTOR_CACHE_DIR", "_DIFFUSION_PO_SET_CACHE_DIR"):
        env.pop(key, None)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def run_one(stage: Stage, out: Path, cap_s: float, echo: Callable[[str], None]) -> dict[str, Any]:
    """Run `stage` as a subprocess for at most `cap_s` seconds, forwarding its output line by line.
    Returns its status row; when the stage wrote no final JSON, writes one with the error."""
    path = out / f"{stage.name}.json"
    if path.exists():
        path.unlink()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    t0 = time.perf_counter()
    env = _stage_env() | {CAP_ENV: f"{cap_s:.0f}"}
    proc = subprocess.Popen(stage.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            errors="replace", env=env, process_group=0)
    _Child.proc = proc

    def forward() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            echo(f"  [{stage.name}] {line}")

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=cap_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(proc)
        rc = proc.returncode
    finally:
        _Child.proc = None
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    written = read_json(path)
    status = (written or {}).get("status")
    if timed_out:
        status = "timeout"
        error = f"stopped at its time cap of {cap_s:.0f} s"
    elif status == "ok":  # all written (a non-zero exit after that, e.g. at teardown, is in `exit`)
        error = None
    elif written is not None and status == "error":
        error = written.get("error")
    else:
        status = "crashed"
        error = f"exit status {rc}" + (" (killed by a signal)" if rc is not None and rc < 0 else "")
    if status != "ok":
        result = (written or {}).get("result", {})
        write_json(path, {"stage": stage.name, "status": status, "error": error, "exit": rc, "wall_s": wall,
                          "cap_s": cap_s, "result": result, "traceback": (written or {}).get("traceback"),
                          "log_tail": list(tail)})
    return {"status": status, "exit": rc, "wall_s": wall, "cap_s": cap_s, "error": error}


def run_gpu_bench(opts: GpuBenchOptions, stages: list[Stage] | None = None,
                  echo: Callable[[str], None] | None = None) -> int:
    """Run the stages in order within `opts.budget_s`; rewrite summary.json after each; print the markdown
    summary last. Returns 0 only when every stage finished (wrote its JSON with status ok)."""
    def say(text: str) -> None:
        print(text, flush=True)

    echo = echo or say
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    own_cache = opts.compile_cache is None
    cache = opts.compile_cache or tempfile.mkdtemp(prefix="diffusion-po-compile-")
    stages = stages if stages is not None else build_stages(opts, cache)
    start = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "size": opts.size,
                               "device": opts.device, "budget_s": opts.budget_s, "compile_cache": cache,
                               "planned": [s.name for s in stages], "stages": rows}

    def on_signal(signum, frame):  # the caller stops us: end the stage, keep the summary
        if _Child.proc is not None:
            _kill(_Child.proc)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        echo(f"[bench gpu] {len(stages)} stages, budget {opts.budget_s:.0f} s, results in {out}")
        for stage in stages:
            left = opts.budget_s - (time.perf_counter() - start) - SUMMARY_RESERVE_S
            cap = min(stage.cap_s, left)
            if cap < min(MIN_START_S, stage.cap_s):
                rows[stage.name] = {"status": "skipped", "error": f"{left:.0f} s left of the budget",
                                    "wall_s": 0.0, "cap_s": cap}
                write_json(out / f"{stage.name}.json", {"stage": stage.name, **rows[stage.name], "result": {}})
                echo(f"[bench gpu] {stage.name}: skipped ({left:.0f} s left of {opts.budget_s:.0f} s)")
                continue
            echo(f"[bench gpu] {stage.name}: start (cap {cap:.0f} s, {left:.0f} s left)")
            rows[stage.name] = run_one(stage, out, cap, echo)
            row = rows[stage.name]
            echo(f"[bench gpu] {stage.name}: end, {row['status']} (exit {row['exit']}) after {row['wall_s']:.1f} s"
                 + (f": {row['error']}" if row["error"] else ""))
            _write_summary(out, summary, start)
    except KeyboardInterrupt:
        echo("[bench gpu] interrupted")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)
    summary = _write_summary(out, summary, start, finished=True)
    names = [s.name for s in stages]
    missing = [n for n in names if rows.get(n, {}).get("status") != "ok"]
    echo("")
    echo(summary["markdown"])
    if missing:
        echo(f"[bench gpu] not finished: {', '.join(missing)}")
        return 1
    echo(f"[bench gpu] all {len(names)} stages finished in {time.perf_counter() - start:.0f} s")
    return 0


# ============================================================================ the summary
def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def headline(out: Path) -> list[dict[str, Any]]:
    """The figures issue 13 asks for, from the stages' JSON files in `out` (stages without a file are left
    out; a figure a stage did not reach is None)."""
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: Any, target: str = "", unit: str = "") -> None:
        rows.append({"figure": figure, "value": value, "target": target, "unit": unit})

    def result(stage: str) -> dict[str, Any] | None:
        written = read_json(out / f"{stage}.json")
        return None if written is None else written.get("result") or {}

    if (env := result("env")) is not None:
        add("device", env.get("device"))
        add("matmul peak", _get(env, "matmul_peak", "tflops"), unit="TFLOP/s")
    if (corr := result("correctness")) is not None:
        add("correctness (one DPO step per family, LoRA step-0 loss = log 2)", corr.get("passed"), "True")
        add("host synchronisations in one train step", _get(corr, "sync", "sync_warnings"), "<= 1")
    for label, row in ((result("sdpa") or {}).get("shapes") or {}).items():
        best = row.get("fastest_fwd_bwd")
        ms, default = _get(row, best, "fwd_bwd_ms") if best else None, _get(row, "default", "fwd_bwd_ms")
        add(f"sdpa {label}: fastest fwd+bwd backend", f"{best} {ms:.3f} ms" if ms else None,
            unit=f"(default {default:.3f} ms)" if default else "")
    for stage, label, target in (("sd15-dpo-full-cold", "SD1.5 full DPO", ">= 2.5x"),
                                 ("sd15-dpo-lora", "SD1.5 LoRA DPO", ">= 2.5x"), ("sdxl-dpo-lora", "SDXL LoRA DPO", ""),
                                 ("sdxl-dpo-full", "SDXL full DPO", ">= 2x")):
        if (r := result(stage)) is None:
            continue
        ours = r.get("ours") or {}
        add(f"{label}: ours / recipe, pairs/s", _get(r, "ratios", "speedup_vs_recipe"), target)
        add(f"{label}: ours pairs/s (MFU)", ours.get("pairs_per_s"),
            unit=f"({100 * ours['mfu']:.1f}%)" if ours.get("mfu") else "")
        add(f"{label}: ours training peak allocated / reserved, GiB", _pair(ours, "peak_gib", "peak_reserved_gib"))
        add(f"{label}: memory ours / recipe at the same pairs", _get(r, "ratios", "memory_vs_recipe_same_pairs"),
            "<= 1" if stage.startswith("sd15") else "")
        add(f"{label}: compiled", ours.get("compiled") or ours.get("error"))
        if ours.get("compile_error"):
            add(f"{label}: compile error", ours["compile_error"])
        for key, how in (("ours_checkpointing", "with"), ("ours_no_checkpointing", "without")):
            if key in r:
                row = r[key]
                add(f"{label}: {how} checkpointing, peak allocated / reserved GiB, pairs/s",
                    row.get("error") or f"{_cell(_pair(row, 'peak_gib', 'peak_reserved_gib'))}, {_cell(row.get('pairs_per_s'))}",
                    "<= 24 GiB" if stage == "sdxl-dpo-lora" and how == "with" else "")
        if choice := r.get("checkpointing_choice"):
            add(f"{label}: chosen", f"{'with' if choice['gradient_checkpointing'] else 'without'} checkpointing "
                                    f"({choice['reason']})")
    for stage, which in (("sd15-dpo-full-cold", "cold"), ("sd15-dpo-full-warm", "warm (compile cache)")):
        if (r := result(stage)) is None:
            continue
        ours = r.get("ours") or {}
        add(f"SD1.5 full: time to first step, {which}", ours.get("time_to_first_step_s"), "<= 90 s", "s")
        if c := ours.get("compile_counters"):
            add(f"SD1.5 full: compile counters, {which}",
                f"graphs {c['graphs']}, breaks {c['graph_breaks']}, recompiles {c['recompiles']}, FX cache hit/miss "
                f"{c['fxgraph_cache_hit']}/{c['fxgraph_cache_miss']}, AOT hit/miss "
                f"{c['aot_autograd_cache_hit']}/{c['aot_autograd_cache_miss']}")
        if "busy_fraction" in (prof := ours.get("profile") or {}):
            ms = prof["ms_per_step"]
            add("SD1.5 full: device busy fraction (profiled steps)", prof["busy_fraction"])
            add("SD1.5 full: ms per step in attention / conv / gemm / triton / optimizer",
                " / ".join(f"{ms.get(k, 0):.1f}" for k in ("attention", "conv", "gemm", "triton", "optimizer"))
                + f" of {prof['window_ms_per_step']:.1f}")
    return rows


def _pair(row: dict[str, Any], a: str, b: str) -> str | None:
    if row.get(a) is None:
        return None
    return f"{row[a]:.1f} / {row[b]:.1f}" if row.get(b) is not None else f"{row[a]:.1f}"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v).replace("|", "/").replace("\n", " ")


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| stage | status | wall s | cap s | note |", "| --- | --- | --- | --- | --- |"]
    for name, row in summary["stages"].items():
        lines.append(f"| {name} | {row['status']} | {row['wall_s']:.0f} | {row['cap_s']:.0f} | "
                     f"{_cell(row.get('error') or '')[:100]} |")
    lines += ["", "| figure | value | target |", "| --- | --- | --- |"]
    for row in summary["headline"]:
        value = _cell(row["value"]) + (f" {row['unit']}" if row["unit"] and row["value"] is not None else "")
        lines.append(f"| {row['figure']} | {value} | {row['target']} |")
    return "\n".join(lines)


def _write_summary(out: Path, summary: dict[str, Any], start: float, finished: bool = False) -> dict[str, Any]:
    summary["elapsed_s"] = time.perf_counter() - start
    summary["headline"] = headline(out)
    summary["not_finished"] = [n for n, r in summary["stages"].items() if r["status"] != "ok"]
    summary["pending"] = [n for n in summary["planned"] if n not in summary["stages"]]
    if finished:
        summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    summary["markdown"] = markdown(summary)
    write_json(out / "summary.json", summary)
    return summary


__all__ = ["CAPS", "DEFAULT_STAGES", "GpuBenchOptions", "Stage", "StageContext", "build_stages", "headline",
           "markdown", "run_gpu_bench", "run_one", "run_stage", "stage_names"]


if __name__ == "__main__":
    sys.exit(stage_main())
