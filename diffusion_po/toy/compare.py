"""`diffusion-po toy compare`: the method leaderboard of the toy world, every method at the same compute budget
over several seeds (docs/methods.md#leaderboard).

    diffusion-po toy compare [--out runs/toy_compare] [--world compositional] [--methods dpo,npo,...]
                             [--seeds 0,1,2] [--pairs 500] [--val 100] [--test 263] [--steps 100]
                             [--checkpoints 4] [--jobs 1] [--threads N] [--set KEY=VALUE]

The defaults: all 11 methods x 3 seeds, about an hour on 2 CPU cores with `--jobs 2 --threads 1`. That is an
estimate; the measured leaderboard in docs/methods.md used `--pairs 240 --steps 40 --checkpoints 2 --val 64
--test 150` and took 22 minutes.

The budget, the same for every method of a seed:
- `--steps` optimizer steps (`max_train_steps`), a checkpoint every steps / `--checkpoints`: the validation
  candidates (step 0, the base, competes too);
- `--pairs` x P generated training images (P = `ToyRunConfig.samples_per_pair()`: 4 in the compositional
  world, whose pairs are the best and the worst of 4 samples, 2 in the simple world): the offline methods (DPO, NPO, DCPO, DRO, KTO, MaPO, SFT, robust DPO) learn from one
  pairs parquet per seed (sampled once and shared); the online methods (curated, online DPO) generate theirs
  during training, `--checkpoints` rounds x prompts per round (steps per round x train_batch_size) x K (their
  shipped config's `samples_per_prompt`) = the same number, so their train_batch_size is those images /
  (steps x K). Self-NPO learns from prompts only (it generates no images).

The seed sets the pairs' `pair_seed` and the trainer's `seed`; the validation and test items are the same for
every seed and method, and the base model's samples of them are scored once (`OUT/cache`). Each run is a
`toy method` run (`diffusion_po.toy.methods.run_method`): validation chooses the checkpoint, the test split is
sampled once by the chosen model. Per method the leaderboard pools the test items of all seeds: the paired
win rate, reward gain and accuracy gain with 95% bootstrap intervals over test prompts (all items of a prompt,
from every seed, resampled together), and the spread over seeds (mean ± sd of the per-seed values).

Layout: `OUT/compare.json` (the protocol), `OUT/cache/`, `OUT/SEED/pairs.parquet`, `OUT/SEED/METHOD/` (a run
folder: results.json, test_scores.jsonl, report.md), `OUT/leaderboard.{md,json,png}`. A run folder with
results.json is finished and never recomputed, so an interrupted compare restarts where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffusion_po.errors import UserError
from diffusion_po.toy import TEST_SEEDS
from diffusion_po.toy.methods import METHODS, NEGATIVE, ONLINE, PROMPTS_ONLY, method_config
from diffusion_po.toy.worlds import DEFAULT_WORLD

#: the leaderboard's methods by default (the issue's list; `dpo_sft` may be added with --methods)
COMPARE_METHODS = ("dpo", "npo", "self_npo", "dcpo", "dro", "kto", "mapo", "sft", "robust_dpo", "curated",
                   "online_dpo")
#: the per-seed values whose spread the leaderboard reports, and where each run's results.json has them
SEED_VALUES = {"win_rate": ("win_rate", "win_rate"), "reward_gain": ("reward_gain", "value"),
               "accuracy_gain": ("accuracy_gain", "value")}


@dataclass
class CompareConfig:
    """The sizes of a leaderboard (the defaults are the command's)."""

    out: str = "runs/toy_compare"
    world: str = DEFAULT_WORLD
    model: str | None = None
    """Base pipeline folder (default: the world's shipped toy base)."""
    methods: tuple[str, ...] = COMPARE_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    n_pairs: int = 500
    n_val: int = 100
    n_test: int = 263
    """Test captions per seed."""
    test_seeds: int = TEST_SEEDS
    """Images per test caption (`ToyRunConfig.test_seeds`)."""
    train_steps: int = 100
    """max_train_steps of every method."""
    checkpoints: int = 4
    """Validation candidates per run (a checkpoint every train_steps / checkpoints; the online methods' rounds)."""
    threads: int | None = None
    """torch threads per run (default: torch's; with jobs > 1: the CPUs shared out)."""
    jobs: int = 1
    """Runs at once, each in its own process."""
    overrides: list[str] = field(default_factory=list)
    """Trainer keys for every run (`--set`), before each method's budget keys (which win)."""
    run_defaults: dict[str, Any] = field(default_factory=dict)
    """Other `ToyRunConfig` fields for every run (tests: a smaller sampler batch)."""


@dataclass(frozen=True)
class Budget:
    """What one method of a compare may spend."""

    method: str
    max_train_steps: int
    checkpointing_steps: int
    generated_images: int
    """Images generated for its training data: 2 per pair (offline), rounds x prompts x K (online), 0 (Self-NPO)."""
    online: dict[str, int] | None = None
    """The online methods' rounds, steps_per_round, train_batch_size and samples_per_prompt (K)."""

    def overrides(self) -> list[str]:
        """The trainer keys that set this budget (`--set` syntax)."""
        keys = [f"max_train_steps={self.max_train_steps}", f"checkpointing_steps={self.checkpointing_steps}"]
        if self.online:
            keys += [f"train_batch_size={self.online['train_batch_size']}",
                     f"method_options.rounds={self.online['rounds']}",
                     f"method_options.steps_per_round={self.online['steps_per_round']}"]
        return keys


def samples_per_prompt(method: str) -> int:
    """K of an online method: its shipped config's `method_options.samples_per_prompt`."""
    from diffusion_po.config import load_yaml

    return int(load_yaml(method_config(method))["method_options"]["samples_per_prompt"])


def pair_images(cfg: CompareConfig) -> int:
    """Images sampled per pair (the runs' `ToyRunConfig.pair_samples`)."""
    from diffusion_po.toy.experiment import ToyRunConfig

    return ToyRunConfig(**{"world": cfg.world, **cfg.run_defaults}).samples_per_pair()


def budget(cfg: CompareConfig, method: str) -> Budget:
    """The compute budget of `method` in the compare `cfg` (a UserError where the sizes cannot be met exactly)."""
    steps, every = cfg.train_steps, cfg.train_steps // cfg.checkpoints
    if steps % cfg.checkpoints:
        raise UserError(f"--steps {steps} must be a multiple of --checkpoints {cfg.checkpoints} (a checkpoint "
                        "every steps / checkpoints steps; the online methods' rounds)")
    images = cfg.n_pairs * pair_images(cfg)
    if method not in ONLINE:
        return Budget(method, steps, every, 0 if method in PROMPTS_ONLY else images)
    k = samples_per_prompt(method)
    if images % (steps * k):
        per_pair = pair_images(cfg)
        unit = steps * k // math.gcd(steps * k, per_pair)
        raise UserError(f"{method} generates its training images itself (K = {k} per prompt): for the same "
                        f"{images} images as the pairs ({per_pair} per pair), {per_pair} x pairs must be a multiple "
                        f"of --steps x K = {steps * k}; use e.g. --pairs {unit * math.ceil(cfg.n_pairs / unit)}, "
                        "or other --steps")
    online = {"rounds": cfg.checkpoints, "steps_per_round": every, "train_batch_size": images // (steps * k),
              "samples_per_prompt": k}
    return Budget(method, steps, every, images, online)


def parse_methods(text: str) -> tuple[str, ...]:
    """`--methods a,b,c` (the names of `toy method`)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise UserError(f"--methods {text!r}: {'unknown method ' + repr(unknown[0]) if unknown else 'no method'}; "
                        f"give a comma-separated list of {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise UserError(f"--methods {text!r} names a method twice")
    return tuple(names)


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds 0,1,2` (distinct non-negative integers)."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UserError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: the seeds must be distinct and non-negative")
    return seeds


def run_dir(cfg: CompareConfig, seed: int, method: str) -> Path:
    return Path(cfg.out) / str(seed) / method


def pairs_path(cfg: CompareConfig, seed: int) -> Path:
    return Path(cfg.out) / str(seed) / "pairs.parquet"


def is_finished(folder: Path) -> bool:
    """A run folder that holds its results (never recomputed)."""
    return (folder / "results.json").is_file()


def run_config(cfg: CompareConfig, seed: int, method: str):
    """The `ToyRunConfig` of one run: the compare's sizes, the seed's pairs and trainer seed, the budget."""
    from diffusion_po.toy.experiment import ToyRunConfig

    return ToyRunConfig(**{**cfg.run_defaults, "out": str(run_dir(cfg, seed, method)), "world": cfg.world,
                           "model": cfg.model, "n_pairs": cfg.n_pairs, "pair_seed": seed, "n_val": cfg.n_val,
                           "n_test": cfg.n_test, "test_seeds": cfg.test_seeds, "threads": cfg.threads,
                           "overrides": [*cfg.overrides, *budget(cfg, method).overrides(), f"seed={seed}"]})


def protocol(cfg: CompareConfig) -> dict[str, Any]:
    """What every run of an output folder must share (compare.json): sizes, world, base, evaluation settings."""
    run = asdict(run_config(cfg, 0, "dpo"))
    for key in ("out", "pair_seed", "overrides", "threads", "config", "keep_checkpoints", "pairs_file"):
        run.pop(key)
    return {**run, "train_steps": cfg.train_steps, "checkpoints": cfg.checkpoints, "overrides": cfg.overrides}


def _check_protocol(cfg: CompareConfig) -> None:
    path = Path(cfg.out) / "compare.json"
    want = protocol(cfg)
    if path.is_file():
        have = json.loads(path.read_text())
        changed = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if changed:
            raise UserError(f"{path}: this folder holds a compare with other settings ({', '.join(changed)}: "
                            f"{', '.join(str(have.get(k)) for k in changed)}); use another --out or the same sizes")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want, indent=2))


def _sample_pairs(cfg: CompareConfig, seed: int) -> None:
    """The seed's pairs parquet (written under a temporary name, so an interrupted sampling leaves none)."""
    from diffusion_po.toy.experiment import prepare_run, sample_pairs

    run = run_config(cfg, seed, "dpo")
    target = pairs_path(cfg, seed)
    run.out = str(target.parent)
    _, _, base = prepare_run(run)
    partial = target.with_name("pairs.partial.parquet")
    sample_pairs(run, base, partial)
    os.replace(partial, target)


def _run_one(cfg: CompareConfig, seed: int, method: str) -> None:
    from diffusion_po.toy.methods import run_method

    pairs = None if method in PROMPTS_ONLY else str(pairs_path(cfg, seed))
    run_method(method, run_config(cfg, seed, method), pairs_file=pairs, cache_dir=str(Path(cfg.out) / "cache"))


def _task(cfg: CompareConfig, kind: str, seed: int, method: str, log: str | None) -> None:
    """One unit of work (the seed's pairs, or one run), in this process or a worker (`log`: its output file)."""
    work = (lambda: _sample_pairs(cfg, seed)) if kind == "pairs" else (lambda: _run_one(cfg, seed, method))
    if log is None:
        work()
        return
    import torch

    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.jobs))
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        work()


def _ready(cfg: CompareConfig, kind: str, seed: int, method: str) -> bool:
    """Whether a task can start: a run on pairs needs its seed's pairs parquet."""
    return kind == "pairs" or method in PROMPTS_ONLY or pairs_path(cfg, seed).is_file()


def _run_tasks(cfg: CompareConfig, tasks: list[tuple[str, int, str]]) -> None:
    """Run `tasks` (kind, seed, method) in order, one after another, or `cfg.jobs` at once in worker processes
    (each run's output in `SEED/METHOD.log`), where a run on pairs starts once its seed's pairs are written."""
    if cfg.jobs == 1:
        for kind, seed, method in tasks:
            print(f"toy compare: {kind} seed {seed}{' ' + method if method else ''}", flush=True)
            _task(cfg, kind, seed, method, None)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    queue, running = list(tasks), {}
    with ProcessPoolExecutor(cfg.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while queue or running:
            while len(running) < cfg.jobs and (task := next((t for t in queue if _ready(cfg, *t)), None)):
                queue.remove(task)
                kind, seed, method = task
                log = (Path(cfg.out) / str(seed) / (f"{method}.log" if method else "pairs.log")).resolve()
                running[pool.submit(_task, cfg, kind, seed, method, str(log))] = task
                print(f"toy compare: {kind} seed {seed}{' ' + method if method else ''} (log: {log})", flush=True)
            if not running:
                raise RuntimeError(f"toy compare: {queue[0]} waits for pairs that no task writes")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                kind, seed, method = running.pop(future)
                future.result()  # the first failure stops the compare (the runs in flight finish; a rerun resumes)


def run_compare(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Every (seed, method) run that is not finished, then the leaderboard; returns its rows (best first)."""
    from diffusion_po.toy.build import ensure_base

    _check_sizes(cfg)
    cfg.model = str(ensure_base(cfg.model, world_name=cfg.world))  # resolved (or built) once, for every run
    _check_protocol(cfg)
    todo = [(s, m) for s in cfg.seeds for m in cfg.methods if not is_finished(run_dir(cfg, s, m))]
    pairs = sorted({s for s, m in todo if m not in PROMPTS_ONLY and not pairs_path(cfg, s).is_file()})
    # the pairs first; then the runs on prompts only, which need no pairs (with --jobs they start beside them)
    runs = sorted(todo, key=lambda t: t[1] not in PROMPTS_ONLY)
    _run_tasks(cfg, [("pairs", s, "") for s in pairs] + [("run", s, m) for s, m in runs])
    rows = aggregate(cfg)
    write_leaderboard(cfg, rows)
    return rows


def _check_sizes(cfg: CompareConfig) -> None:
    for name, value in (("pairs", cfg.n_pairs), ("val", cfg.n_val), ("test", cfg.n_test),
                        ("test-seeds", cfg.test_seeds), ("steps", cfg.train_steps),
                        ("checkpoints", cfg.checkpoints), ("jobs", cfg.jobs), ("threads", cfg.threads)):
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")
    if not cfg.methods or not cfg.seeds:
        raise UserError("toy compare needs at least one method (--methods) and one seed (--seeds)")
    for method in cfg.methods:
        budget(cfg, method)  # every size problem before any work


# --- aggregation


def _mean_sd(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else None}


def aggregate(cfg: CompareConfig) -> list[dict[str, Any]]:
    """The leaderboard rows of the finished runs in `cfg.out`, sorted by pooled win rate (best first)."""
    from diffusion_po.eval.stats import bootstrap_mean_ci, paired_win_rate
    from diffusion_po.toy.experiment import ToyRunConfig, caption_means
    from diffusion_po.toy.worlds import get_world

    toy_world = get_world(cfg.world)
    stats = ToyRunConfig(**cfg.run_defaults)  # the bootstrap's resamples and seed, the tie tolerance
    rows = []
    for method in cfg.methods:
        runs = [(s, run_dir(cfg, s, method)) for s in cfg.seeds if is_finished(run_dir(cfg, s, method))]
        if not runs:
            continue
        prompts: list[str] = []  # one entry per (seed, test caption): the caption's means over its images
        tuned: list[float] = []
        base: list[float] = []
        accuracy_gain: list[float] = []
        per_seed = []
        for seed, folder in runs:
            items = [json.loads(line) for line in (folder / "test_scores.jsonl").read_text().splitlines()]
            results = [(toy_world.result_from_dict(i["tuned"]), toy_world.result_from_dict(i["base"])) for i in items]
            captions = [i["prompt"] for i in items]
            keys, tuned_means = caption_means(captions, [t.reward for t, _ in results])
            prompts.extend(keys)
            tuned.extend(tuned_means)
            base.extend(caption_means(captions, [b.reward for _, b in results])[1])
            accuracy_gain.extend(caption_means(captions, [toy_world.accuracy(t) - toy_world.accuracy(b)
                                                          for t, b in results])[1])
            res = json.loads((folder / "results.json").read_text())
            per_seed.append({"seed": seed, **{k: float(res[a][b]) for k, (a, b) in SEED_VALUES.items()},
                             "chosen_step": res["chosen_step"], "total_s": res["timings_s"].get("total")})
        boot = {"n_boot": stats.n_boot, "seed": stats.eval_seed, "groups": prompts}
        rows.append({
            "method": method,
            "guidance": method in NEGATIVE,
            "seeds": [s for s, _ in runs],
            "n_items": len(prompts),  # (seed, caption) units
            "n_prompts": len(set(prompts)),
            "win_rate": paired_win_rate(tuned, base, tie_tol=stats.tie_tol, **boot).to_dict(),
            "reward_gain": bootstrap_mean_ci([t - b for t, b in zip(tuned, base)], **boot).to_dict(),
            "accuracy_gain": bootstrap_mean_ci(accuracy_gain, **boot).to_dict(),
            "spread": {k: _mean_sd([p[k] for p in per_seed]) for k in SEED_VALUES},
            "per_seed": per_seed,
            "budget": asdict(budget(cfg, method)),
        })
    rows.sort(key=lambda r: (-r["win_rate"]["win_rate"], -r["reward_gain"]["value"], r["method"]))
    return rows


def _interval(ci: dict[str, float], scale: float = 1.0, digits: int = 3, sign: str = "") -> str:
    return (f"{scale * ci['value' if 'value' in ci else 'win_rate']:{sign}.{digits}f} "
            f"[{scale * ci['lo']:{sign}.{digits}f}, {scale * ci['hi']:{sign}.{digits}f}]")


def _spread(s: dict[str, float | None], scale: float = 1.0, digits: int = 3, sign: str = "") -> str:
    sd = "–" if s["sd"] is None else f"{scale * s['sd']:.{digits}f}"
    return f"{scale * s['mean']:{sign}.{digits}f} ± {sd}"


def _seconds(per_seed: list[dict[str, Any]]) -> str:
    """The mean wall time of a method's runs (sampling, training, validation and test)."""
    times = [p["total_s"] for p in per_seed if p.get("total_s") is not None]
    return f"{sum(times) / len(times):.0f}" if times else "–"


def leaderboard_markdown(cfg: CompareConfig, rows: list[dict[str, Any]]) -> str:
    """leaderboard.md: the protocol in a paragraph, then one row per method (best win rate first)."""
    every = cfg.train_steps // cfg.checkpoints
    lines = [
        f"# Toy-world method leaderboard ({cfg.world} world)", "",
        f"Every method at the same budget per seed: {cfg.train_steps} optimizer steps (a checkpoint every {every}, "
        f"chosen on {cfg.n_val} validation items; step 0, the base, competes) and {cfg.n_pairs * pair_images(cfg)} "
        f"generated training images ({cfg.n_pairs} pairs x {pair_images(cfg)}, shared by the offline methods; the "
        "online methods: "
        f"{cfg.checkpoints} round(s) x prompts x K; Self-NPO: prompts only). Test: {cfg.n_test} held-out captions per "
        f"seed, {cfg.test_seeds} image(s) each, base and method with the same sampling seeds; a win is a caption "
        "whose mean reward over its images rises. Intervals: 95% paired bootstrap over the test captions, the "
        "captions of all seeds pooled; ± : the standard deviation of the per-seed values. NPO and Self-NPO "
        "are scored as the negative branch of NPO guidance against plain CFG; s per run: the mean wall time of "
        "one run (DRO's replay buffer and Self-NPO's teacher rollouts sample inside their training steps).", "",
        "| rank | method | seeds | win rate [95% CI] | per seed | reward gain [95% CI] | per seed "
        "| accuracy gain, points [95% CI] | per seed | chosen steps | s per run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        name = f"{r['method']} (NPO guidance)" if r["guidance"] else r["method"]
        sp = r["spread"]
        lines.append(
            f"| {i} | {name} | {','.join(map(str, r['seeds']))} | **{_interval(r['win_rate'])}** "
            f"| {_spread(sp['win_rate'])} | {_interval(r['reward_gain'], digits=4, sign='+')} "
            f"| {_spread(sp['reward_gain'], digits=4, sign='+')} "
            f"| {_interval(r['accuracy_gain'], 100, 1, '+')} | {_spread(sp['accuracy_gain'], 100, 1, '+')} "
            f"| {', '.join(str(p['chosen_step']) for p in r['per_seed'])} | {_seconds(r['per_seed'])} |")
    return "\n".join(lines) + "\n"


def plot_leaderboard(rows: list[dict[str, Any]], path: Path) -> None:
    """Dot-and-interval plot: win rate and accuracy gain per method (pooled estimate, 95% interval, seeds as
    small dots), best method on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 0.45 * len(rows) + 1.4
    fig, axes = plt.subplots(1, 2, figsize=(10, height), sharey=True, squeeze=False)
    ys = list(range(len(rows)))[::-1]
    for ax, key, scale, ref, title in ((axes[0][0], "win_rate", 1.0, 0.5, "win rate over the base"),
                                       (axes[0][1], "accuracy_gain", 100.0, 0.0, "accuracy gain (points)")):
        for y, r in zip(ys, rows):
            ci = r[key]
            point = ci["win_rate"] if key == "win_rate" else ci["value"]
            first = y == ys[0]
            ax.plot([scale * ci["lo"], scale * ci["hi"]], [y, y], color="C0", lw=2,
                    label="pooled, 95% interval" if first else None)
            ax.plot([scale * point], [y], "o", color="C0", ms=7)
            seeds = [scale * p[key] for p in r["per_seed"]]
            ax.plot(seeds, [y - 0.18] * len(seeds), ".", color="grey", ms=5, label="seeds" if first else None)
        ax.axvline(scale * ref, color="grey", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
    axes[0][0].set_yticks(ys, [r["method"] for r in rows])
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    axes[0][0].set_ylim(-0.6, len(rows) - 0.4)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))  # room for the legend below
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_leaderboard(cfg: CompareConfig, rows: list[dict[str, Any]]) -> None:
    """leaderboard.md, leaderboard.json and leaderboard.png in `cfg.out`."""
    out = Path(cfg.out)
    (out / "leaderboard.md").write_text(leaderboard_markdown(cfg, rows))
    (out / "leaderboard.json").write_text(json.dumps({"protocol": protocol(cfg), "methods": rows}, indent=2))
    if rows:
        plot_leaderboard(rows, out / "leaderboard.png")


__all__ = ["COMPARE_METHODS", "Budget", "CompareConfig", "aggregate", "budget", "leaderboard_markdown",
           "parse_methods", "parse_seeds", "plot_leaderboard", "run_compare", "run_config", "write_leaderboard"]
