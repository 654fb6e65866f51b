"""`eval benchmark`: generate (or reuse) images of a model and a baseline, score both, compare, report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffusion_po.eval.compare import compare_runs, format_summary
from diffusion_po.eval.generate import GenerateConfig, generate_images
from diffusion_po.eval.report import write_report
from diffusion_po.eval.scorers import Scorer
from diffusion_po.eval.scoring import load_score_table, score_run


def run_benchmark(
    out: str | Path,
    scorers: list[Scorer],
    *,
    model_cfg: GenerateConfig | None = None,
    baseline_cfg: GenerateConfig | None = None,
    a_images: str | Path | None = None,
    b_images: str | Path | None = None,
    label_a: str = "model",
    label_b: str = "baseline",
    metrics: list[str] | None = None,
    device: str | None = None,
    gen_batch_size: int = 4,
    score_batch_size: int = 32,
    num_workers: int | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole benchmark into ``out``: ``out/A`` and ``out/B`` image runs (unless existing runs are
    given with ``a_images``/``b_images``), their scores, ``compare.json`` and ``report.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Path] = {}
    settings: dict[str, Any] = {}
    for side, cfg, images in (("A", model_cfg, a_images), ("B", baseline_cfg, b_images)):
        if images is not None:
            runs[side] = Path(images)
            settings[f"{side} images"] = str(images)
            continue
        if cfg is None:
            raise ValueError(f"side {side}: give a model config or an image run")
        runs[side] = generate_images(cfg, out / side, device=device, batch_size=gen_batch_size, progress=progress)
        settings[f"{side} model"] = cfg.model + (f" + LoRA {cfg.lora}" if cfg.lora else "") + (
            f" + network {cfg.network}" if cfg.network else ""
        )
    gen = model_cfg or baseline_cfg
    if gen is not None:
        settings.update({
            "prompts": gen.prompts, "images per prompt": gen.n, "base seed": gen.seed, "steps": gen.steps,
            "guidance scale": gen.guidance_scale, "scheduler": gen.scheduler or "pipeline default",
        })
    score_dirs: dict[str, Path] = {}
    for side, run in runs.items():
        # scores of reused runs are written next to this benchmark, not into someone else's folder
        score_out = run if run.parent == out else out / f"scores_{side}"
        score_run(run, scorers, score_out, batch_size=score_batch_size, num_workers=num_workers, progress=progress)
        score_dirs[side] = score_out
    result = compare_runs(
        score_dirs["A"], score_dirs["B"], metrics, label_a=label_a, label_b=label_b, n_boot=n_boot, seed=seed
    )
    rows_a, _ = load_score_table(score_dirs["A"])
    rows_b, _ = load_score_table(score_dirs["B"])
    report = write_report(result, out, rows_a, rows_b, settings=settings, title=f"Benchmark: {label_a} vs {label_b}")
    result["report"] = str(report)
    (out / "compare.json").write_text(json.dumps(result, indent=1, default=str))
    result["summary"] = format_summary(result)
    return result


def same_generation(cfg: GenerateConfig, model: str, lora: str | None, network: str | None) -> GenerateConfig:
    """The baseline's config: same prompts, seeds and sampler as ``cfg``, another model."""
    return replace(cfg, model=model, lora=lora, network=network)
