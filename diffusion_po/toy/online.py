"""Online preference learning in the toy world, round by round: curated retraining (Ferbach et al. 2024) and
online Diffusion-DPO, both on the shared trainer (`method: curated` / `method: online_dpo`,
`diffusion_po.objectives.online`).

    diffusion-po toy online curated|online_dpo [--out runs/toy_online_METHOD] [--rounds 5] [--prompts 512]
        [--real-fraction 0.5] [--bias red:0.3] [--set key=value] [--compare RUN ...]

1. **Data**: `--prompts` train captions (`prompts.txt`), or with `--real-fraction` lambda > 0 (curated only)
   the world's expert images of those captions (`real_images.parquet`, data format `images`: drawings that
   satisfy their captions exactly), with `method_options.real_data_fraction` = lambda.
2. **Training** through the shared trainer with the shipped `configs/toy_METHOD.yaml` over `configs/toy_dpo.yaml`
   (`experiment.trainer_config`, then `--set`), the world's oracle as the reward (`toy_compositional`, or
   `toy` for the simple world), `--rounds` rounds of `steps_per_round` steps and one checkpoint per round.
   `--bias COLOUR:WEIGHT` gives the reward a known bias (`toy.scorer`: + WEIGHT x the share of the image's
   foreground in COLOUR).
3. **Evaluation** of every round's checkpoint (round 0 = the base) with the *unbiased* oracle on the
   validation captions with fixed seeds: the mean reward, each oracle part (`ToyWorld.summarize`), the share
   of the foreground in each palette colour (the bias's prevalence), and the diversity: for
   `--diversity-prompts` validation captions, `--diversity-samples` images each (other seeds), the entropy in
   bits of the detected objects' colours, shapes and positions (the 3 x 3 grid cell of each centre,
   `compositional_oracle.detect`), averaged over the captions. Falling entropy = mode collapse.

Outputs in `--out`: `prompts.txt` or `real_images.parquet`, `train/` (trainer output, `metrics.jsonl`),
`results.json` (`rounds`: one row per round with the keys above; `train_rounds`: the reward of each round's
own samples as the trainer saw it, i.e. the possibly biased reward), `report.md`, `curves.png` (with
`--compare`, earlier runs on the same axes; `diffusion-po toy online-plot RUN ...` draws finished runs).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: the online methods of the shared trainer (each has a shipped configs/toy_METHOD.yaml)
ONLINE_METHODS = ("curated", "online_dpo")
#: cells per side of the grid that an object's centre falls in (the position of the diversity measure)
POSITION_CELLS = 3


@dataclass
class OnlineRunConfig:
    """Sizes of one online toy run (the defaults: 5 rounds of the shipped config's 20 steps)."""

    method: str = "curated"
    out: str | None = None
    """Run folder (default runs/toy_online_METHOD)."""
    world: str = "compositional"
    model: str | None = None
    """Base pipeline folder (default: the world's shipped toy base)."""
    rounds: int = 5
    n_prompts: int = 512
    """Train captions the rounds sample for (and, with real_fraction, the expert images' captions)."""
    prompt_seed: int = 0
    real_fraction: float = 0.0
    """lambda of curated retraining: the share of training rows that are real (expert) images."""
    bias: str | None = None
    """COLOUR:WEIGHT, a known bias of the reward (evaluation stays unbiased)."""
    overrides: list[str] = field(default_factory=list)
    n_val: int = 152
    diversity_prompts: int = 8
    diversity_samples: int = 16
    eval_seed: int = 1234
    steps: int = 10
    """Evaluation sampler steps (DPM-Solver++, as the toy model is used)."""
    scale: float = 4.0
    batch_size: int = 64
    threads: int | None = None
    keep_checkpoints: bool = False

    @property
    def folder(self) -> Path:
        return Path(self.out or f"runs/toy_online_{self.method}")


def parse_bias(spec: str) -> tuple[str, float]:
    """'red:0.3' -> ('red', 0.3); anything else is a UserError naming the palette."""
    from diffusion_po.errors import UserError
    from diffusion_po.toy.world import COLOURS

    colour, sep, weight = spec.partition(":")
    try:
        value = float(weight) if sep else float("nan")
    except ValueError:
        value = float("nan")
    if colour not in COLOURS or not math.isfinite(value):
        raise UserError(f"--bias '{spec}': expected COLOUR:WEIGHT with COLOUR one of {', '.join(COLOURS)} and WEIGHT "
                        "a number, e.g. red:0.3")
    return colour, value


def check_run(cfg: OnlineRunConfig) -> None:
    """The run's settings, each a one-line UserError when wrong (before anything is loaded)."""
    from diffusion_po.errors import UserError

    if cfg.method not in ONLINE_METHODS:
        raise UserError(f"unknown online method '{cfg.method}'; choose one of {', '.join(ONLINE_METHODS)}")
    flags = {"rounds": "--rounds", "n_prompts": "--prompts", "n_val": "--val", "diversity_prompts": "--diversity-prompts",
             "diversity_samples": "--diversity-samples", "steps": "--sample-steps"}
    for name, flag in flags.items():
        if getattr(cfg, name) <= 0:
            raise UserError(f"{flag} must be positive, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.real_fraction <= 1.0:
        raise UserError(f"--real-fraction must be in [0, 1], got {cfg.real_fraction}")
    if cfg.real_fraction > 0 and cfg.method != "curated":
        raise UserError(f"--real-fraction mixes real images into curated retraining; {cfg.method} trains on its own "
                        "samples only (drop --real-fraction)")
    if cfg.bias is not None:
        parse_bias(cfg.bias)


def entropy_bits(labels: Iterable[Hashable]) -> float:
    """The entropy in bits of the empirical distribution of `labels` (0 for none or one kind)."""
    counts = Counter(labels)
    n = sum(counts.values())
    return float(-sum(c / n * math.log2(c / n) for c in counts.values())) if n else 0.0


def position_cell(cx: float, cy: float, resolution: int = 32, cells: int = POSITION_CELLS) -> tuple[int, int]:
    """The (column, row) of the `cells` x `cells` grid that the point (cx, cy) of a resolution-px image lies in."""
    def index(v: float) -> int:
        return min(cells - 1, max(0, int(v * cells / resolution)))
    return index(cx), index(cy)


def diversity(groups: Sequence[Sequence[Any]]) -> dict[str, float]:
    """The mean over `groups` (the images of one caption each) of the entropy in bits of the detected objects'
    colour, shape and position cell; `entropy` is the mean of the three."""
    from diffusion_po.toy.compositional_oracle import detect

    per_group = []
    for images in groups:
        objects = [o for im in images for o in detect(im)]
        per_group.append({"colour_entropy": entropy_bits(o.colour for o in objects),
                          "shape_entropy": entropy_bits(o.shape for o in objects),
                          "position_entropy": entropy_bits(position_cell(o.cx, o.cy) for o in objects)})
    out = {k: float(sum(g[k] for g in per_group) / len(per_group)) for k in per_group[0]} if per_group else {}
    if out:
        out["entropy"] = (out["colour_entropy"] + out["shape_entropy"] + out["position_entropy"]) / 3
    return out


def colour_shares(images: Sequence[Any]) -> dict[str, float]:
    """The mean share of the foreground in each palette colour over `images` (`oracle.colour_fraction`)."""
    from diffusion_po.toy.oracle import colour_fraction
    from diffusion_po.toy.world import COLOURS

    return {c: float(sum(colour_fraction(im, c, of_foreground=True) for im in images) / max(1, len(images)))
            for c in COLOURS}


def _steps_per_round(config_file: str, overrides: list[str]) -> int:
    from diffusion_po.config import apply_overrides, load_yaml

    data = apply_overrides(json.loads(json.dumps(load_yaml(config_file))), overrides)
    return int(data["method_options"]["steps_per_round"])  # every shipped toy_METHOD config sets it


def toy_run(cfg: OnlineRunConfig) -> Any:
    """The `experiment.ToyRunConfig` of the run: the shipped toy_METHOD config, the rounds (max_train_steps =
    rounds x steps_per_round, a checkpoint per round), the world's oracle as reward (with the bias), the real
    data, then the user's `--set` overrides."""
    from diffusion_po.toy.experiment import ToyRunConfig
    from diffusion_po.toy.methods import method_config
    from diffusion_po.toy.worlds import get_world

    config = method_config(cfg.method)
    per_round = _steps_per_round(config, cfg.overrides)
    derived = [f"method_options.rounds={cfg.rounds}", f"max_train_steps={cfg.rounds * per_round}",
               f"checkpointing_steps={per_round}", f"method_options.reward.name={get_world(cfg.world).scorer_metric}"]
    if cfg.bias is not None:
        colour, weight = parse_bias(cfg.bias)
        derived += [f"method_options.reward.options.bias_colour={colour}",
                    f"method_options.reward.options.bias_weight={weight}"]
    if cfg.real_fraction > 0:
        derived += ["data.format=images", f"method_options.real_data_fraction={cfg.real_fraction}"]
    return ToyRunConfig(out=str(cfg.folder), world=cfg.world, model=cfg.model, config=config,
                        overrides=[*derived, *cfg.overrides], n_val=cfg.n_val, eval_seed=cfg.eval_seed,
                        steps=cfg.steps, scale=cfg.scale, batch_size=cfg.batch_size, threads=cfg.threads,
                        keep_checkpoints=cfg.keep_checkpoints)


def write_data(cfg: OnlineRunConfig, out: Path) -> tuple[Path, dict[str, Any]]:
    """The training data: `prompts.txt` of train captions, or (real_fraction > 0) `real_images.parquet` of the
    world's expert images of them (PNG bytes, data format `images`). Returns (file, summary)."""
    from diffusion_po.toy.worlds import get_world

    toy_world = get_world(cfg.world)
    captions = toy_world.prompts(cfg.n_prompts, cfg.prompt_seed, split="train")
    if cfg.real_fraction == 0:
        path = out / "prompts.txt"
        path.write_text("\n".join(captions) + "\n")
        return path, {"prompts": len(captions), "file": str(path)}
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(image: Any) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    images = toy_world.expert_images(captions, cfg.prompt_seed)
    path = out / "real_images.parquet"
    pq.write_table(pa.table({"image": pa.array([png(im) for im in images], pa.binary()),
                             "caption": pa.array(captions, pa.string())}), path)
    return path, {"real_images": len(images), "file": str(path), "real_fraction": cfg.real_fraction}


def eval_plan(cfg: OnlineRunConfig, run: Any) -> dict[str, list]:
    """The fixed evaluation items shared by every round: the validation captions and seeds of `run` (its
    `experiment.ToyRunConfig`), and the diversity captions (distinct validation captions) each repeated
    `diversity_samples` times with their own seeds."""
    from diffusion_po.toy.experiment import eval_items, eval_seeds
    from diffusion_po.toy.worlds import get_world

    val_prompts, val_seeds = eval_items(run, "val")
    distinct = list(dict.fromkeys(get_world(cfg.world).prompts(cfg.diversity_prompts, cfg.eval_seed + 4,
                                                               split="val")))
    div_prompts = [c for c in distinct for _ in range(cfg.diversity_samples)]
    return {"val_prompts": val_prompts, "val_seeds": val_seeds, "div_captions": distinct, "div_prompts": div_prompts,
            "div_seeds": eval_seeds(len(div_prompts), cfg.eval_seed + 5)}


def evaluate_round(images: list[Any], plan: dict[str, list], cfg: OnlineRunConfig) -> dict[str, Any]:
    """One round's row from the images of `plan` (validation items first, then the diversity items)."""
    from diffusion_po.toy.worlds import get_world

    n = len(plan["val_prompts"])
    val_images, div_images = images[:n], images[n:]
    toy_world = get_world(cfg.world)
    row: dict[str, Any] = dict(toy_world.summarize(toy_world.score_many(val_images, plan["val_prompts"])))
    row["colour_share"] = colour_shares(val_images)
    k = cfg.diversity_samples
    row.update(diversity([div_images[i : i + k] for i in range(0, len(div_images), k)]))
    return row


def _train_rounds(metrics: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per round, the trainer's running `round/...` means at the round's last logged step."""
    last: dict[int, dict[str, Any]] = {}
    for m in metrics:
        if "round" in m:
            last[int(m["round"])] = m
    return [{"round": r, "step": int(m["step"]), **{k[len("round/"):]: v for k, v in m.items() if k.startswith("round/")}}
            for r, m in sorted(last.items())]


def run_label(results: dict[str, Any]) -> str:
    """A short name of a run for plots and tables: method, reference, lambda, bias."""
    label = results["method"]
    options = results.get("train_config", {}).get("method_options", {})
    if results["method"] == "online_dpo":
        label += f" ({options.get('reference', 'fixed')} ref)"
    if results.get("real_fraction"):
        label += f" λ={results['real_fraction']:g}"
    if results.get("bias"):
        label += f" bias {results['bias']['colour']}:{results['bias']['weight']:g}"
    return label


def run_online(cfg: OnlineRunConfig, compare: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Data -> rounds of online training -> per-round evaluation; returns the results (also results.json)."""
    import torch

    from diffusion_po.toy import pairs as toy_pairs
    from diffusion_po.toy.experiment import checkpoint_model, prepare_run, read_metrics, sampler, train_stage
    from diffusion_po.training import checkpoint as ckpt

    check_run(cfg)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    run = toy_run(cfg)
    out, base_path, base = prepare_run(run)
    earlier = [load_results(f) for f in compare]

    t0 = time.perf_counter()
    data_file, data_info = write_data(cfg, out)
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_dir = out / "train"
    train_cfg = train_stage(run, base_path, data_file, train_dir)
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plan = eval_plan(cfg, run)
    prompts, seeds = plan["val_prompts"] + plan["div_prompts"], plan["val_seeds"] + plan["div_seeds"]
    rows = [{"round": 0, "step": 0, **evaluate_round(sampler(base, run)(prompts, seeds, "round 0 (base)"), plan, cfg)}]
    checkpoints = ckpt.list_checkpoints(train_dir)
    for i, c in enumerate(checkpoints, 1):
        pipe = toy_pairs.with_unet(base, *checkpoint_model(c))
        images = sampler(pipe, run)(prompts, seeds, f"round {i}")
        rows.append({"round": i, "step": ckpt.step_of(c), **evaluate_round(images, plan, cfg)})
    timings["evaluation"] = time.perf_counter() - t0
    if not cfg.keep_checkpoints:
        for c in checkpoints:
            shutil.rmtree(c, ignore_errors=True)
    timings["total"] = time.perf_counter() - started

    bias = None
    if cfg.bias is not None:
        colour, weight = parse_bias(cfg.bias)
        bias = {"colour": colour, "weight": weight}
    results = {
        "method": cfg.method, "world": cfg.world, "rounds": rows,
        "train_rounds": _train_rounds(read_metrics(train_dir / "metrics.jsonl")),
        "bias": bias, "real_fraction": cfg.real_fraction, "data": data_info,
        "diversity_captions": plan["div_captions"], "n_val": len(plan["val_prompts"]),
        "train_config": {k: getattr(train_cfg, k) for k in ("method", "learning_rate", "train_batch_size",
                                                            "max_train_steps", "checkpointing_steps", "use_lora",
                                                            "method_options")},
        "run": asdict(cfg), "threads": torch.get_num_threads(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    results["label"] = run_label(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_report(results, out / "report.md")
    plot_rounds([*earlier, results], out / "curves.png")
    return results


def load_results(folder: str | Path) -> dict[str, Any]:
    """results.json of a finished online run (a UserError naming the folder when there is none)."""
    from diffusion_po.errors import UserError

    path = Path(folder) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a finished online run ({exc}); give the --out folder of `toy online`") from None
    if "rounds" not in results or "method" not in results:
        raise UserError(f"{path}: not the results of `diffusion-po toy online` (no per-round rows)")
    results.setdefault("label", run_label(results))
    return results


def _bias_colour(results: dict[str, Any]) -> str:
    return (results.get("bias") or {}).get("colour", "red")


def write_report(results: dict[str, Any], path: Path) -> None:
    """report.md: the per-round table (unbiased oracle on validation captions; round 0 = the base)."""
    from diffusion_po.toy.worlds import get_world

    toy_world = get_world(results["world"])
    parts = [(k, name) for k, name in toy_world.report_parts if k in results["rounds"][0]]
    colour = _bias_colour(results)
    tc = results["train_config"]
    o = tc["method_options"]
    lines = [
        f"# Toy world ({results['world']}): online preference learning, {results['label']}", "",
        f"{results['method']} on the shared trainer: {o.get('rounds')} rounds of {o.get('steps_per_round')} steps "
        f"(batch {tc['train_batch_size']}, lr {tc['learning_rate']:g}, K = {o.get('samples_per_prompt')} samples "
        f"per prompt), reward `{o.get('reward', {}).get('name')}`"
        + (f" with a known bias (+{results['bias']['weight']:g} x the foreground share of {colour})"
           if results.get("bias") else "")
        + (f", real data fraction λ = {results['real_fraction']:g}" if results.get("real_fraction") else "") + ".",
        "",
        f"Every round's model on {results['n_val']} validation items (fixed seeds), scored by the unbiased oracle; "
        f"diversity: entropy (bits) of the detected objects' colour / shape / position (3 x 3 cell) over "
        f"{results['run']['diversity_samples']} samples of each of {len(results['diversity_captions'])} "
        "validation captions (lower = mode collapse).", "",
        "| round | step | reward | " + " | ".join(name for _, name in parts)
        + f" | {colour} share | colour H | shape H | position H |",
        "|---|---|---|" + "---|" * len(parts) + "---|---|---|---|",
    ]
    for r in results["rounds"]:
        lines.append(f"| {r['round']} | {r['step']} | {r['reward']:.4f} | " + " | ".join(f"{r[k]:.3f}" for k, _ in parts)
                     + f" | {r['colour_share'][colour]:.3f} | {r.get('colour_entropy', 0):.2f} | "
                     f"{r.get('shape_entropy', 0):.2f} | {r.get('position_entropy', 0):.2f} |")
    if results["train_rounds"]:
        keys = [k for k in results["train_rounds"][0] if k not in ("round", "step") and "/" not in k]
        lines += ["", "The reward of each round's own training samples, as the trainer's reward saw them"
                  + (" (biased)" if results.get("bias") else "") + " (the model at the round's start):", "",
                  "| round | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for r in results["train_rounds"]:
            lines.append(f"| {r['round']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    lines += ["", "![curves](curves.png)", "",
              f"Timings (s, {results['threads']} threads): "
              + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()), ""]
    path.write_text("\n".join(lines))


def plot_rounds(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """curves.png: per round, the oracle reward, the caption accuracy, the diversity (mean entropy) and the bias
    colour's share, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from diffusion_po.toy.worlds import get_world

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for i, res in enumerate(runs):
        toy_world = get_world(res["world"])
        rounds = [r["round"] for r in res["rounds"]]
        colour = _bias_colour(res)
        series = ((axes[0], "reward"), (axes[1], toy_world.accuracy_key), (axes[2], "entropy"))
        for ax, key in series:
            ax.plot(rounds, [r.get(key, float("nan")) for r in res["rounds"]], "o-", color=f"C{i}", label=res["label"])
        axes[3].plot(rounds, [r["colour_share"][colour] for r in res["rounds"]], "o-", color=f"C{i}",
                     label=f"{res['label']} ({colour})")
    titles = ("validation reward (unbiased oracle)", "caption accuracy", "diversity: mean entropy (bits)",
              "foreground share of the bias colour")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round (0 = base)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["ONLINE_METHODS", "OnlineRunConfig", "check_run", "colour_shares", "diversity", "entropy_bits",
           "eval_plan", "load_results", "parse_bias", "plot_rounds", "position_cell", "run_label", "run_online",
           "toy_run", "write_data", "write_report"]
