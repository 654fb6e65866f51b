"""`diffusion-po bench`: our trainer and sampler against the reference recipes, in one process.

Each training case builds a random-initialised network of real size (or tiny size on the CPU), runs
**our real trainer step** (`Trainer.train_step` on a `Trainer` built from the config, fed a batch in the
data cache's format, as `data.format: cache` gives it) and the reference recipe (`bench/reference.py`)
on the same architecture, and reports pairs/s, peak GPU memory, model FLOP utilisation and the ratios.
Sampling cases time the stock diffusers pipeline against our sampler at the same settings.

Model FLOPs per pair (winner + loser): full fine-tune 2 x (3F policy forward+backward + F reference) =
8F; LoRA 2 x (2F + F) = 6F (no weight gradients of the frozen base), F = one network forward of one
image counted by `torch.utils.flop_counter`. Recomputation (gradient checkpointing) is not counted.
MFU = model FLOPs / time / the measured dense bf16 matrix-product rate.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from diffusion_po.bench.cases import CASES
from diffusion_po.bench.measure import (
    count_flops,
    free_memory,
    kernel_profile,
    matmul_peak_tflops,
    peak_gib,
    peak_reserved_gib,
    reset_peak,
    sync,
    time_steps,
)
from diffusion_po.bench.models import RESOLUTION, build_pipeline
from diffusion_po.families import network_of


@dataclasses.dataclass
class Settings:
    size: str = "tiny"
    device: str = "auto"
    steps: int = 0
    """Timed steps per measurement (0: 10 on a GPU, 2 on the CPU)."""
    warmup: int = 0
    """Untimed calls before timing, the first included (0: 3 on a GPU, 1 on the CPU)."""
    reference: bool = True
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Trainer config keys for our path (speed switches), e.g. {"compile": "none"}."""
    profile_steps: int = 0
    """Steps of our path to profile with torch.profiler after timing (0: none)."""

    def resolved(self) -> Settings:
        dev = self.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        gpu = dev.startswith("cuda")
        return dataclasses.replace(self, device=dev, steps=self.steps or (10 if gpu else 2),
                                   warmup=self.warmup or (3 if gpu else 1))

    @property
    def amp(self) -> bool:
        """bf16 mixed precision on a GPU (the recipes' setting), fp32 on the CPU."""
        return torch.device(self.device).type == "cuda"


def _environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


# ----------------------------------------------------------------------------- training
def _cond_shapes(family: Any) -> dict[str, Any]:
    """One prompt's conditioning as the family encodes it (on the CPU, once)."""
    with torch.no_grad():
        cond = family.encode_prompts(["a photo of a cat"], resolution=None)
    return {k: v[0] for k, v in cond.items()}


def _forward_flops(pipe: Any, cond: dict[str, torch.Tensor], resolution: int, device: torch.device,
                   amp: bool) -> int:
    """F: FLOPs of one network forward on one image (eager)."""
    from diffusion_po.families import family_for_pipeline

    family = family_for_pipeline(pipe)
    net = network_of(pipe)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    x = torch.randn(1, int(net.config.in_channels), resolution // f, resolution // f, device=device)
    c = {k: v[None].to(device) for k, v in cond.items()}
    t = torch.tensor([500.0], device=device)

    def fwd() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            family.predict(net, x, t, c)

    return count_flops(fwd)


def _cached_batch(family: Any, cond: dict[str, torch.Tensor], n: int, paired: bool, resolution: int,
                  device: torch.device) -> dict[str, Any]:
    """A batch as the data cache's loader gives it (posterior mean/std, a prompt table), on `device`."""
    g = torch.Generator().manual_seed(0)
    f = family.vae_scale_factor
    shape = (n, family.latent_channels, resolution // f, resolution // f)
    batch: dict[str, Any] = {"size": n, "row_ids": list(range(n)), "bad_rows": []}
    for suffix in (["_w", "_l"] if paired else [""]):
        batch[f"latent_mean{suffix}"] = torch.randn(shape, generator=g).to(device)
        batch[f"latent_std{suffix}"] = (0.01 + 0.02 * torch.rand(shape, generator=g)).to(device)
    captions = [f"prompt {i}" for i in range(n)]
    table_cond = {k: v[None].repeat(n + 1, *([1] * v.dim())).to(device) for k, v in cond.items()
                  if k not in family.row_keys}
    batch["captions"] = captions
    batch["prompt_table"] = {"index": {text: i for i, text in enumerate([""] + captions)}, "cond": table_cond}
    batch["original_sizes"] = torch.tensor([[resolution, resolution]] * n)
    batch["crop_top_lefts"] = torch.zeros(n, 2, dtype=torch.long)
    return batch


def _our_trainer(pipe: Any, model: str, s: Settings, pairs: int, lora: bool, checkpointing: bool,
                 method: str = "dpo", method_options: dict[str, Any] | None = None):
    from accelerate.state import AcceleratorState

    from diffusion_po.config import TrainConfig, from_dict
    from diffusion_po.families import family_for_pipeline
    from diffusion_po.training.trainer import Trainer

    AcceleratorState._reset_state()
    keys = {
        "method": method, "pretrained_model_name_or_path": f"<random {model}>",
        "output_dir": tempfile.mkdtemp(prefix="dpo-bench-"), "resolution": RESOLUTION[(model, s.size)],
        "train_batch_size": pairs, "learning_rate": 1e-5 if lora else 1e-8, "mixed_precision": "bf16" if s.amp else "no",
        "use_lora": lora, "rank": 8, "gradient_checkpointing": checkpointing, "report_to": "none",
        "max_grad_norm": 1.0, "data": {"format": "cache"}, "method_options": method_options or {},
    }
    keys.update(s.overrides)
    cfg = from_dict(TrainConfig, keys, "diffusion-po bench")
    return Trainer(cfg, family=family_for_pipeline(pipe))


def _ours(pipe: Any, model: str, s: Settings, dev: torch.device, pairs: int, lora: bool, checkpointing: bool,
          cond: dict[str, torch.Tensor]) -> dict[str, Any]:
    from diffusion_po.families.compiling import compile_counters

    free_memory(dev)
    before = compile_counters()
    t0 = time.perf_counter()
    trainer = _our_trainer(pipe, model, s, pairs, lora, checkpointing)
    setup = time.perf_counter() - t0
    batch = _cached_batch(trainer.family, cond, pairs, True, trainer.cfg.resolution, dev)
    reset_peak(dev)  # the training peak: weights, optimizer state and the steps, not set-up transients
    try:
        t = time_steps(lambda: trainer.train_step(batch), dev, s.warmup, s.steps)
        after = compile_counters()
        out = {"pairs": pairs, "pairs_per_s": pairs / t["mean_s"], "step_ms": 1e3 * t["mean_s"],
               "step_ms_median": 1e3 * t["median_s"], "first_step_s": t["first_s"], "setup_s": setup,
               "time_to_first_step_s": setup + t["first_s"], "peak_gib": peak_gib(dev),
               "peak_reserved_gib": peak_reserved_gib(dev), "gradient_checkpointing": checkpointing,
               "compiled": trainer.compiled, "compile_error": trainer.compile_error,
               "compile_counters": {k: after[k] - before.get(k, 0) for k in after},
               "channels_last": trainer.channels_last}
        if s.profile_steps:
            out["profile"] = _safe(kernel_profile, lambda: trainer.train_step(batch), dev, s.profile_steps)
    finally:
        trainer = batch = None
        free_memory(dev)
    return out


def _recipe(pipe: Any, model: str, s: Settings, dev: torch.device, pairs: int, lora: bool, checkpointing: bool,
            with_encoders: bool, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
    from diffusion_po.bench.reference import reference_step

    source = network_of(pipe)
    home = next(source.parameters()).device
    source.to("cpu")  # the recipe's peak memory is its own: our copy of the network waits on the CPU
    free_memory(dev)
    step, release = reference_step(pipe, model, pairs, RESOLUTION[(model, s.size)],
                                   {k: tuple(v.shape) for k, v in cond.items()}, dev, lora=lora,
                                   with_encoders=with_encoders, gradient_checkpointing=checkpointing, amp=s.amp)
    reset_peak(dev)  # as for ours: the training peak
    try:
        t = time_steps(step, dev, s.warmup, s.steps)
        out = {"pairs": pairs, "pairs_per_s": pairs / t["mean_s"], "step_ms": 1e3 * t["mean_s"],
               "step_ms_median": 1e3 * t["median_s"], "first_step_s": t["first_s"], "peak_gib": peak_gib(dev),
               "peak_reserved_gib": peak_reserved_gib(dev), "gradient_checkpointing": checkpointing,
               "encoders_each_step": with_encoders}
    finally:
        release()
        step = None
        free_memory(dev)
        source.to(home)
    return out


def _safe(fn, *args, **kwargs) -> dict[str, Any]:
    try:
        return fn(*args, **kwargs)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as exc:  # a failing case must not stop the others
        return {"error": f"{type(exc).__name__}: {exc}"[:400], "traceback": traceback.format_exc()[-1500:]}


#: the device's share that our path without gradient checkpointing must leave free to be chosen
ROOM_MARGIN = 0.10


def choose_checkpointing(without: dict[str, Any], total_gib: float | None) -> dict[str, Any]:
    """SDXL's rule: train without gradient checkpointing when that run fit (no error) and its measured
    training peak (reserved) leaves at least ROOM_MARGIN of the device's memory free; else checkpoint.
    `total_gib` is None on the CPU (no memory limit is measured: the run fitting decides)."""
    peak = without.get("peak_reserved_gib")
    if "error" in without:
        ok, why = False, f"without checkpointing: {without['error'][:120]}"
    elif total_gib is None or peak is None:
        ok, why = True, "without checkpointing ran (no device memory limit measured here)"
    else:
        ok = peak <= (1 - ROOM_MARGIN) * total_gib
        why = (f"without checkpointing the training peak is {peak:.1f} GiB reserved of {total_gib:.1f} GiB "
               f"({'leaves' if ok else 'does not leave'} {ROOM_MARGIN:.0%} free)")
    return {"gradient_checkpointing": not ok, "reason": why}


def train_case(name: str, spec: dict[str, Any], s: Settings, peak_tflops: float,
               partial=None) -> dict[str, Any]:
    """One training case. `partial(result)`, if given, is called after every variant (so a caller killed
    for time keeps what was measured)."""
    from diffusion_po.families import family_for_pipeline

    def done(result: dict[str, Any]) -> None:
        if partial is not None:
            partial(result)

    dev = torch.device(s.device)
    model, lora, ckpt = spec["model"], spec["lora"], spec["checkpointing"]
    pairs, recipe_pairs = spec["pairs"][s.size], spec["recipe_pairs"][s.size]
    res = RESOLUTION[(model, s.size)]
    free_memory(dev)
    pipe = build_pipeline(model, s.size, network_device=dev)
    cond = _cond_shapes(family_for_pipeline(pipe))
    flops_f = _forward_flops(pipe, cond, res, dev, s.amp)
    per_pair = (6 if lora else 8) * flops_f
    result: dict[str, Any] = {"model": model, "resolution": res, "lora": lora, "gradient_checkpointing": ckpt,
                              "forward_gflop_per_image": flops_f / 1e9, "model_gflop_per_pair": per_pair / 1e9}
    variants: list[tuple[int, bool]] = []
    if s.reference:
        enc = spec["recipe_encoders"]
        variants = list(dict.fromkeys([(recipe_pairs, enc), (pairs, enc), (pairs, False)]))
        for p, e in variants:
            key = f"recipe_p{p}_{'encoders' if e else 'cached'}"
            result[key] = _safe(_recipe, pipe, model, s, dev, p, lora, ckpt, e, cond)
            done(result)
    if "gradient_checkpointing" in s.overrides:  # the user's choice wins over the case's and the rule
        ckpt = bool(s.overrides["gradient_checkpointing"])
        result["ours"] = _safe(_ours, pipe, model, s, dev, pairs, lora, ckpt, cond)
    elif spec.get("choose_checkpointing"):
        result["ours_checkpointing"] = _safe(_ours, pipe, model, s, dev, pairs, lora, True, cond)
        done(result)
        # the trainer changed the network in place (checkpointing on, adapters): a fresh one, same seed
        pipe = None
        free_memory(dev)
        pipe = build_pipeline(model, s.size, network_device=dev)
        without = result["ours_no_checkpointing"] = _safe(_ours, pipe, model, s, dev, pairs, lora, False, cond)
        total = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.type == "cuda" else None
        result["checkpointing_choice"] = choose_checkpointing(without, total)
        chosen = result["checkpointing_choice"]["gradient_checkpointing"]
        result["ours"] = result["ours_checkpointing" if chosen else "ours_no_checkpointing"]
    else:
        result["ours"] = _safe(_ours, pipe, model, s, dev, pairs, lora, ckpt, cond)
    for row in result.values():
        if isinstance(row, dict) and "pairs_per_s" in row:
            row["mfu"] = row["pairs_per_s"] * per_pair / (peak_tflops * 1e12)
    ours = result["ours"]
    ratios: dict[str, Any] = {}
    if "pairs_per_s" in ours and s.reference:
        base = result.get(f"recipe_p{recipe_pairs}_{'encoders' if spec['recipe_encoders'] else 'cached'}", {})
        same = result.get(f"recipe_p{pairs}_{'encoders' if spec['recipe_encoders'] else 'cached'}", {})
        cached = result.get(f"recipe_p{pairs}_cached", {})
        if "pairs_per_s" in base:
            ratios["speedup_vs_recipe"] = ours["pairs_per_s"] / base["pairs_per_s"]
        if "pairs_per_s" in cached:
            ratios["speedup_vs_recipe_cached_same_pairs"] = ours["pairs_per_s"] / cached["pairs_per_s"]
        if ours.get("peak_gib") and same.get("peak_gib"):
            ratios["memory_vs_recipe_same_pairs"] = ours["peak_gib"] / same["peak_gib"]
    result["ratios"] = ratios
    # the memory target (SDXL LoRA in 24 GiB) is for the checkpointing path, whichever is chosen here
    result["checks"] = _checks(spec.get("targets", {}), ratios, ours,
                               memory_row=result.get("ours_checkpointing", ours))
    done(result)
    pipe = None
    free_memory(dev)
    return result


def _checks(targets: dict[str, float], ratios: dict[str, Any], ours: dict[str, Any],
            memory_row: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, target in targets.items():
        if key in ("speedup_vs_recipe", "speedup_vs_stock"):
            value = ratios.get(key)
            ok = None if value is None else value >= target
        elif key == "memory_vs_recipe_same_pairs":
            value = ratios.get(key)
            ok = None if value is None else value <= target
        elif key == "perp_neg_vs_cfg_step":
            value = ratios.get(key)
            ok = None if value is None else value <= target
        elif key == "first_step_s":
            value = ours.get("time_to_first_step_s")
            ok = None if value is None else value <= target
        elif key == "peak_gib_max":
            value = (memory_row or ours).get("peak_gib")
            ok = None if value is None else value <= target
        else:
            continue
        out[key] = {"target": target, "value": value, "ok": ok}
    return out


# ----------------------------------------------------------------------------- online (DRO)
def dro_case(name: str, spec: dict[str, Any], s: Settings, peak_tflops: float) -> dict[str, Any]:
    """Diffusion-DRO's step: the buffer's few-step sampling with the policy snapshot, then the loss."""
    from diffusion_po.families import family_for_pipeline

    dev = torch.device(s.device)
    model = spec["model"]
    n = spec["images"][s.size]
    free_memory(dev)
    pipe = build_pipeline(model, s.size, network_device=dev)
    cond = _cond_shapes(family_for_pipeline(pipe))

    def run() -> dict[str, Any]:
        trainer = _our_trainer(pipe, model, s, n, lora=False, checkpointing=False, method="dro",
                               method_options={"buffer_sample_steps": 1})
        method = trainer.method
        spent = {"s": 0.0, "calls": 0}
        fill = method.fill

        def timed_fill(ctx, batch):
            sync(dev)
            t0 = time.perf_counter()
            fill(ctx, batch)
            sync(dev)
            spent["s"] += time.perf_counter() - t0
            spent["calls"] += 1

        method.fill = timed_fill
        batch = _cached_batch(trainer.family, cond, n, False, trainer.cfg.resolution, dev)
        try:
            t = time_steps(lambda: trainer.train_step(batch), dev, s.warmup, s.steps)
            calls = s.warmup + s.steps
            sampling = spent["s"] / max(1, spent["calls"])
            steps = method.options.sampler_steps
            return {"images": n, "images_per_s": n / t["mean_s"], "step_ms": 1e3 * t["mean_s"],
                    "sampling_ms_per_step": 1e3 * sampling, "sampler_steps": steps,
                    "sampling_ms_per_solver_step": 1e3 * sampling / steps,
                    "sampling_fraction": sampling / t["mean_s"], "fills": spent["calls"], "calls": calls,
                    "peak_gib": peak_gib(dev), "first_step_s": t["first_s"]}
        finally:
            trainer = batch = None
            free_memory(dev)

    result = {"model": model, "resolution": RESOLUTION[(model, s.size)], "ours": _safe(run)}
    pipe = None
    free_memory(dev)
    return result


# ----------------------------------------------------------------------------- sampling
def sample_case(name: str, spec: dict[str, Any], s: Settings, peak_tflops: float) -> dict[str, Any]:
    """Stock `pipe(...)` against our sampler (eager, then compiled), 8 images, 50 steps, CFG 7.5; and the
    per-step cost of CFG, Perp-Neg and NPO guidance."""
    from diffusion_po.families import speed_up_for_sampling
    from diffusion_po.sampling import generate
    from diffusion_po.sampling.bench import compare

    dev = torch.device(s.device)
    model = spec["model"]
    n, steps = spec["images"][s.size], spec["steps"][s.size]
    dtype = torch.bfloat16 if s.amp else torch.float32
    free_memory(dev)
    pipe = build_pipeline(model, s.size, network_device=dev).to(dev, dtype)
    res = RESOLUTION[(model, s.size)]
    prompts = ["a red circle above a blue square"] * n
    reps = 1 if s.size == "full" else 1

    def stock() -> None:
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
        pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=7.5, generator=gens, height=res, width=res)

    def ours() -> None:
        generate(pipe, prompts, seeds=list(range(n)), guidance="cfg", scale=7.5, steps=steps, height=res,
                 width=res, batch_size=n)

    result: dict[str, Any] = {"model": model, "resolution": res, "images": n, "steps": steps, "guidance_scale": 7.5,
                              "dtype": str(dtype).replace("torch.", "")}

    def timed(fn) -> dict[str, Any]:
        t = time_steps(fn, dev, warmup=1, steps=reps)
        return {"images_per_s": n / t["mean_s"], "s_per_batch": t["mean_s"], "first_call_s": t["first_s"],
                "peak_gib": peak_gib(dev)}

    step_kwargs = {"batch": n, "steps": 3 if s.size == "full" else 2, "warmup": 2, "height": res, "width": res}
    result["stock"] = _safe(timed, stock)
    result["ours_eager"] = _safe(timed, ours)
    result["step_ms_eager"] = _safe(compare, pipe, ("cfg", "perp-neg", "npo-lora"), rounds=1, **step_kwargs)
    compile_it = s.overrides.get("compile", "auto") not in ("none",) and dev.type == "cuda"
    result["speed_up"] = speed_up_for_sampling(pipe, compile=compile_it)
    result["ours"] = _safe(timed, ours)
    # NPO's LoRA negative model would add a second set of compiled graphs: its cost is measured eager
    result["step_ms"] = _safe(compare, pipe, ("cfg", "perp-neg"), rounds=1, **step_kwargs)
    ratios: dict[str, Any] = {}
    if "images_per_s" in result["stock"] and "images_per_s" in result["ours"]:
        ratios["speedup_vs_stock"] = result["ours"]["images_per_s"] / result["stock"]["images_per_s"]
    if "images_per_s" in result["stock"] and "images_per_s" in result["ours_eager"]:
        ratios["eager_sampler_vs_stock"] = result["ours_eager"]["images_per_s"] / result["stock"]["images_per_s"]
    if "perp-neg" in result["step_ms"]:
        ratios["perp_neg_vs_cfg_step"] = result["step_ms"]["perp-neg"]["x_cfg"]
    if "npo-lora" in result["step_ms_eager"]:
        ratios["npo_vs_cfg_step_eager"] = result["step_ms_eager"]["npo-lora"]["x_cfg"]
        ratios["perp_neg_vs_cfg_step_eager"] = result["step_ms_eager"]["perp-neg"]["x_cfg"]
    result["ratios"] = ratios
    result["checks"] = _checks(spec.get("targets", {}), ratios, {})
    pipe = None
    free_memory(dev)
    return result


KINDS = {"train": train_case, "dro": dro_case, "sample": sample_case}


# ----------------------------------------------------------------------------- the run
def run_bench(cases: list[str] | None, settings: Settings, json_path: str | Path | None = None,
              echo=print) -> dict[str, Any]:
    """Run `cases` (default all) and return the results; the JSON file is rewritten after every case."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting warnings of random-initialised models are noise here
    s = settings.resolved()
    dev = torch.device(s.device)
    names = cases or list(CASES)
    unknown = [c for c in names if c not in CASES]
    if unknown:
        from diffusion_po.errors import UserError

        raise UserError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    report: dict[str, Any] = {"size": s.size, "settings": {**dataclasses.asdict(s)}, "environment": _environment(dev),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "cases": {}}
    report["matmul_peak"] = matmul_peak_tflops(dev)
    peak = report["matmul_peak"]["tflops"]
    echo(f"device: {report['environment']['device']}; measured {report['matmul_peak']['dtype']} matmul peak "
         f"{peak:.4g} TFLOP/s")
    for name in names:
        spec = CASES[name]
        t0 = time.perf_counter()
        echo(f"[{name}] ...")
        try:
            result = KINDS[spec["kind"]](name, spec, s, peak)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"[:400], "traceback": traceback.format_exc()[-1500:]}
        result["kind"] = spec["kind"]
        result["wall_s"] = time.perf_counter() - t0
        import torch._dynamo as dynamo

        dynamo.reset()  # compiled graphs of this case's networks go with them (the disk cache stays)
        free_memory(dev)
        report["cases"][name] = result
        echo(format_case(name, result))
        if json_path:
            Path(json_path).write_text(json.dumps(report, indent=1, default=str))
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1, default=str))
    return report


# ----------------------------------------------------------------------------- the table
def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def format_case(name: str, r: dict[str, Any]) -> str:
    """The rows of one case, as text."""
    if "error" in r and "ours" not in r:
        return f"  {name}: error: {r['error']}"
    lines = []
    kind = r.get("kind")
    if kind == "train":
        lines.append(f"  {'variant':34s} {'pairs':>5s} {'pairs/s':>8s} {'step ms':>8s} {'peak GiB':>8s} "
                     f"{'reserved':>8s} {'MFU %':>6s} {'1st step s':>10s}")
        both = "checkpointing_choice" in r  # then "ours" is one of the two rows below
        for key, row in r.items():
            if key == "ours" and both:
                continue
            if not (key.startswith(("ours", "recipe_"))) or not isinstance(row, dict):
                continue
            label = {"ours": "ours (trainer, cached)", "ours_checkpointing": "ours, checkpointing",
                     "ours_no_checkpointing": "ours, no checkpointing"}.get(key, key.replace("_", " "))
            if "error" in row:
                lines.append(f"  {label:34s} error: {row['error'][:80]}")
                continue
            first = row.get("time_to_first_step_s", row.get("first_step_s"))
            mfu = row.get("mfu")
            lines.append(f"  {label:34s} {row['pairs']:5d} {_fmt(row['pairs_per_s']):>8s} {_fmt(row['step_ms'], '.1f'):>8s} "
                         f"{_fmt(row.get('peak_gib')):>8s} {_fmt(row.get('peak_reserved_gib')):>8s} "
                         f"{_fmt(None if mfu is None else 100 * mfu, '.1f'):>6s} "
                         f"{_fmt(first, '.1f'):>10s}")
    elif kind == "dro" and "images_per_s" in r.get("ours", {}):
        o = r["ours"]
        lines.append(f"  DRO: {o['images']} images/step, {_fmt(o['images_per_s'])} images/s, step {_fmt(o['step_ms'], '.1f')} ms, "
                     f"buffer sampling {_fmt(o['sampling_ms_per_step'], '.1f')} ms/step "
                     f"({_fmt(100 * o['sampling_fraction'], '.0f')}% of the step, {o['sampler_steps']} solver steps)")
    if kind == "sample":
        for key in ("stock", "ours_eager", "ours"):
            row = r.get(key, {})
            if "error" in row:
                lines.append(f"  {key:12s} error: {row['error'][:80]}")
            elif row:
                lines.append(f"  {key:12s} {_fmt(row['images_per_s'], '.3f')} images/s ({r['images']} images, "
                             f"{r['steps']} steps; first call {_fmt(row['first_call_s'], '.1f')} s)")
        for key in ("step_ms_eager", "step_ms"):
            row = r.get(key, {})
            if row and "error" not in row:
                costs = ", ".join(f"{m} {_fmt(v['ms'], '.1f')} ms (x{_fmt(v['x_cfg'])})" for m, v in row.items())
                lines.append(f"  per step {'(eager)' if key.endswith('eager') else '(fast)':8s} {costs}")
    if "checkpointing_choice" in r:
        choice = r["checkpointing_choice"]
        lines.append(f"  chosen: {'with' if choice['gradient_checkpointing'] else 'without'} gradient "
                     f"checkpointing ({choice['reason']})")
    if r.get("error") and "ours" in r:
        lines.append(f"  error: {r['error']}")
    for key, value in (r.get("ratios") or {}).items():
        lines.append(f"  {key}: {_fmt(value)}")
    for key, c in (r.get("checks") or {}).items():
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[c["ok"]]
        lines.append(f"  check {key}: {_fmt(c['value'])} (target {c['target']}) {mark}")
    return f"{name}\n" + "\n".join(lines)


__all__ = ["CASES", "Settings", "format_case", "run_bench"]
