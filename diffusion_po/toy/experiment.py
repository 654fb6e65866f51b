"""The toy protocol and the README main job: Diffusion-DPO on toy pairs from the toy base model, then an honest
evaluation.

    pairs -> train (the shared trainer, data format `pickapic`) -> early stopping on validation reward
          -> test: base vs tuned on held-out prompts with fixed seeds -> report

The trainer keys come from the shipped `configs/toy_dpo.yaml` (the one source of the toy defaults), then a
method's config over it, then `--set` overrides. `choose_and_test` is the protocol every toy experiment with
checkpoints shares (the main job here, the other methods in `diffusion_po.toy.methods`).

Early stopping: the trainer writes a checkpoint every `eval_every` steps; each one samples the
validation prompts (split `val`, never used for pairs or the final test) and the checkpoint with the
highest mean oracle reward is the tuned model (step 0, the base itself, competes too, so a run that only
hurts reports a win rate of 0.5 rather than hiding it). The test split (`test`; 263 of its captions) is then
sampled once by the base and once by the chosen model with the same seeds; the paired win rate (ties
half) and its 95% bootstrap interval come from `diffusion_po.eval.stats.paired_win_rate`.

Outputs in the run folder: `pairs.parquet`, `train/` (trainer output, `metrics.jsonl`), `val.jsonl`,
`test_scores.jsonl`, `grid.png`, `curves.png`, `results.json`, `report.md`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_po.toy import TEST_SEEDS
from diffusion_po.toy import pairs as toy_pairs
from diffusion_po.toy.worlds import DEFAULT_WORLD, ToyWorld, get_world


@dataclass
class ToyRunConfig:
    """Sizes of the main job (the defaults are the README run)."""

    out: str = "runs/toy_dpo"
    world: str = DEFAULT_WORLD
    """The toy world: "compositional" (the default) or "simple" (`diffusion_po.toy.worlds`)."""
    model: str | None = None
    """Base pipeline folder (default: the shipped toy base)."""
    config: str | None = None
    """A YAML of trainer keys over the shipped configs/toy_dpo.yaml (e.g. configs/toy_kto.yaml)."""
    overrides: list[str] = field(default_factory=list)
    n_pairs: int = 1000
    pair_samples: int | None = None
    """Images sampled per pair prompt: 2 (the pair), or K > 2 (the pair is the best and the worst of K);
    None: the world's main-job setting (`ToyWorld.pair_samples`: 4 compositional, 2 simple)."""
    pair_seed: int = 0
    label_noise: float = 0.0
    min_margin: float = 0.0
    n_val: int = 152
    n_test: int = 263
    """Test captions."""
    test_seeds: int = TEST_SEEDS
    """Images per test caption, each with its own seed: the win rate and the gains compare each caption's mean
    over them (one image per caption leaves the comparison to seed-level noise: see docs/toy.md)."""
    eval_seed: int = 1234
    steps: int = toy_pairs.DEFAULT_STEPS
    scale: float = toy_pairs.DEFAULT_SCALE
    batch_size: int = 64
    n_boot: int = 2000
    tie_tol: float = 1e-3
    """Reward differences at most this large count as ties (half a win): pixel-level noise decides nothing."""
    pairs_file: str | None = None
    """Use this pairs parquet instead of sampling new pairs."""
    grid_prompts: int = 10
    threads: int | None = None
    keep_checkpoints: bool = False

    def samples_per_pair(self) -> int:
        """K: the images sampled per pair prompt (`pair_samples`, or the world's setting)."""
        return self.pair_samples or get_world(self.world).pair_samples


#: the shipped config (`diffusion_po/configs/`) every toy training run starts from
DEFAULTS_CONFIG = "toy_dpo"


def trainer_config(run: ToyRunConfig, base: Path, pairs_file: Path, output_dir: Path):
    """The TrainConfig of the training stage: the shipped `toy_dpo` config, the world's overlay over it (the
    simple world's `toy_simple`), then `run.config` (each `data` section merged key by key), then
    `run.overrides`."""
    from diffusion_po.config import (
        TrainConfig,
        apply_overrides,
        from_dict,
        load_yaml,
        parse_override,
        validate,
    )
    from diffusion_po.shipped import config_path

    defaults = config_path(DEFAULTS_CONFIG)
    shipped = load_yaml(defaults)
    shipped.setdefault("data", {})
    source = str(defaults)
    overlay = get_world(run.world).config_overlay
    if overlay:
        _merge_config(shipped, load_yaml(config_path(overlay)))
        source = f"{config_path(overlay).name} over {defaults.name}"
    data: dict[str, Any] = json.loads(json.dumps(shipped))  # a deep copy: `shipped` stays the defaults
    given: set[str] = set()  # keys the user's config or overrides set (for an override, its first and last part)
    if run.config:
        extra = load_yaml(config_path(run.config))  # a file, or a shipped config by name (toy_kto)
        _merge_config(data, extra)
        given |= set(extra)
        source = f"{run.config} over {source}"
    if run.overrides:
        data = apply_overrides(data, run.overrides)
        for key in (parse_override(o)[0].split(".") for o in run.overrides):
            given |= {key[0], key[-1]}  # method_options.beta_dpo=... gives beta_dpo too
        source += " (with --set overrides)"
    data["pretrained_model_name_or_path"] = str(base)
    data["output_dir"] = str(output_dir)
    data["data"]["data_files"] = [str(pairs_file)]
    data["data"]["format"] = data["data"].get("format", "pickapic")
    _drop_unread_method_defaults(data, shipped, given)
    cfg = from_dict(TrainConfig, data, source)
    validate(cfg, source)
    return cfg


def _merge_config(data: dict[str, Any], extra: dict[str, Any]) -> None:
    """`extra`'s keys over `data`'s, the `data` section key by key. A method setting that may be spelled at the
    top level (`beta_dpo`) or under `method_options` replaces `data`'s in either spelling (a method config's
    `method_options.beta_dpo` over the simple world's top-level `beta_dpo`). In place."""
    from diffusion_po.config import METHOD_KEY_ALIASES

    options = extra.get("method_options") if isinstance(extra.get("method_options"), dict) else {}
    for key in METHOD_KEY_ALIASES:
        if key in options:
            data.pop(key, None)
        if key in extra and isinstance(data.get("method_options"), dict):
            data["method_options"].pop(key, None)
    for key, value in extra.items():
        if key == "data" and isinstance(value, dict):
            data.setdefault("data", {}).update(value)
        else:
            data[key] = value


def _drop_unread_method_defaults(data: dict[str, Any], defaults: dict[str, Any], given: set[str]) -> None:
    """The DPO defaults' method settings (beta_dpo) carry over to another method only if it reads them (npo,
    robust_dpo, ...); for the others (kto, mapo, sft, ...) they are dropped, not an error, unless the user's
    config or overrides set them (`given`: then validation names the key the method does not read). In place."""
    from diffusion_po.config import METHOD_KEY_ALIASES
    from diffusion_po.objectives import get_method_class

    reads = get_method_class(data.get("method", "dpo")).option_names()
    for key in METHOD_KEY_ALIASES:
        if key in defaults and key not in reads and key not in given:
            data.pop(key, None)


def eval_seeds(n: int, seed: int) -> list[int]:
    """The fixed sampling seeds of an evaluation split (shared by base and tuned, so images pair up)."""
    return [seed * 1_000_003 + i for i in range(n)]


def eval_items(run: ToyRunConfig, split: str) -> tuple[list[str], list[int]]:
    """The items (caption, seed) of the validation (`val`: `n_val` captions, one image each) or test (`test`:
    `n_test` captions, each `test_seeds` times in a row) split of a run, shared by every model compared on it (so
    images pair up); every item has its own seed."""
    offset = {"val": 0, "test": 2}[split]
    n, per_caption = (run.n_val, 1) if split == "val" else (run.n_test, run.test_seeds)
    captions = get_world(run.world).prompts(n, run.eval_seed + offset, split=split)
    prompts = [c for c in captions for _ in range(per_caption)]
    return prompts, eval_seeds(len(prompts), run.eval_seed + offset + 1)


def caption_means(prompts: Sequence[Any], values: Sequence[float], first: int | None = None
                  ) -> tuple[list[Any], list[float]]:
    """Each distinct caption's mean of `values` over its items (its seeds; with `first`, over its first `first`
    items only), in the order captions first appear: (captions, means)."""
    sums: dict[Any, list[float]] = {}
    for prompt, value in zip(prompts, values, strict=True):
        sums.setdefault(prompt, []).append(float(value))
    return list(sums), [float(np.mean(v[:first])) for v in sums.values()]


def sample_pairs(run: ToyRunConfig, base: Any, path: Path):
    """Oracle-labelled pairs from the base model on train prompts, written to `path` (the run's sizes)."""
    return toy_pairs.write_pairs(base, path, run.n_pairs, run.pair_seed, "train", run.label_noise,
                                 run.min_margin, run.steps, run.scale, run.batch_size, world=run.world,
                                 samples_per_prompt=run.samples_per_pair())


def train_stage(run: ToyRunConfig, base_path: Path, data_file: Path, train_dir: Path):
    """Train through the shared trainer into a fresh `train_dir`; returns the TrainConfig used."""
    from diffusion_po.training.trainer import train

    if train_dir.exists():
        shutil.rmtree(train_dir)
    cfg = trainer_config(run, base_path, data_file, train_dir)
    train(cfg)
    return cfg


#: sample images: (prompts, seeds, progress label) -> images
Sampler = Callable[[list[str], list[int], str], list[Any]]
#: sample images with a checkpoint's model: (checkpoint folder, prompts, seeds, progress label) -> images
CheckpointSampler = Callable[[Path, list[str], list[int], str], list[Any]]


def sampler(pipe: Any, run: ToyRunConfig) -> Sampler:
    """Plain CFG sampling of `pipe` with the run's sampler settings."""
    def sample(prompts: list[str], seeds: list[int], desc: str) -> list[Any]:
        return toy_pairs.sample(pipe, prompts, seeds, run.steps, run.scale, run.batch_size, progress=True, desc=desc)
    return sample


def evaluate(pipe: Any, prompts: list[str], seeds: list[int], run: ToyRunConfig, desc: str) -> tuple[list, list]:
    """Sample and score; returns (images, oracle results)."""
    images = sampler(pipe, run)(prompts, seeds, desc)
    return images, get_world(run.world).score_many(images, prompts)


def checkpoint_model(ckpt: Path) -> tuple[Path | None, Path | None]:
    """(unet folder, None) for a full fine-tune checkpoint, (None, checkpoint) for a LoRA one."""
    if (ckpt / "unet").is_dir():
        return ckpt / "unet", None
    lora = ckpt / "pytorch_lora_weights.safetensors"
    if lora.is_file():
        return None, ckpt
    raise FileNotFoundError(f"{ckpt}: neither unet/ nor pytorch_lora_weights.safetensors")


def _curve_row(step: int, results: list[Any], toy_world: ToyWorld) -> dict[str, float]:
    summary = toy_world.summarize(results)
    return {"step": step, "reward": summary["reward"], **{k: summary[k] for k in toy_world.curve_keys}}


def _base_results(cache_dir: Path | None, key: dict[str, Any], sample: Sampler, prompts: list[str],
                  seeds: list[int], desc: str, toy_world: ToyWorld) -> tuple[list | None, list[Any]]:
    """(images, oracle results) of the base model's samples; with `cache_dir` the results are cached on disk
    by (world, model, prompts, seeds, sampler) and the images are None when they come from the cache."""
    if cache_dir is not None:
        digest = hashlib.sha1(json.dumps({**key, "world": toy_world.name, "prompts": prompts, "seeds": seeds},
                                         sort_keys=True).encode())
        path = cache_dir / f"base-{digest.hexdigest()[:16]}.json"
        if path.is_file():
            return None, [toy_world.result_from_dict(d) for d in json.loads(path.read_text())]
    images = sample(prompts, seeds, desc)
    results = toy_world.score_many(images, prompts)
    if cache_dir is not None:  # written whole under another name first: runs in parallel may share the cache
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps([r.to_dict() for r in results]))
        os.replace(partial, path)
    return images, results


@dataclass
class Selection:
    """What the protocol measured: the validation curve over checkpoints, the chosen one, the paired test."""

    val_curve: list[dict[str, float]]
    best_step: int
    checkpoints: list[Path]
    test_prompts: list[str]
    test_seeds: list[int]
    base_results: list[Any]
    tuned_results: list[Any]
    base_images: list | None
    """None when the base's test results came from the cache."""
    tuned_images: list | None
    win_rate: Any
    """`diffusion_po.eval.stats.WinRate` of tuned over base on the test captions (each caption's mean reward
    over its seeds)."""
    image_win_rate: Any
    """The same on single images (item against item, the interval resampling captions)."""
    timings_s: dict[str, float]
    """Wall time of the `validation` and the `test` stage."""


def choose_and_test(run: ToyRunConfig, train_dir: Path, sample_base: Sampler, sample_tuned: CheckpointSampler,
                    cache_dir: Path | None = None, base_id: str = "") -> Selection:
    """The toy protocol: validation reward of every checkpoint in `train_dir` (step 0 = `sample_base`
    competes), then the best against `sample_base` on the test split with the same seeds; writes
    `test_scores.jsonl` into `run.out`. `cache_dir` keeps the base's rewards (keyed by `base_id`)."""
    from diffusion_po.training import checkpoint as ckpt

    t0 = time.perf_counter()
    toy_world = get_world(run.world)
    key = {"model": base_id, "steps": run.steps, "scale": run.scale}
    val_prompts, val_seeds = eval_items(run, "val")
    _, base_val = _base_results(cache_dir, key, sample_base, val_prompts, val_seeds, "validation: base", toy_world)
    val_curve = [_curve_row(0, base_val, toy_world)]
    checkpoints = ckpt.list_checkpoints(train_dir)
    for c in checkpoints:
        step = ckpt.step_of(c)
        images = sample_tuned(c, val_prompts, val_seeds, f"validation: step {step}")
        val_curve.append(_curve_row(step, toy_world.score_many(images, val_prompts), toy_world))
    best = max(val_curve, key=lambda r: r["reward"])
    timings = {"validation": time.perf_counter() - t0}

    t0 = time.perf_counter()
    test_prompts, test_seeds = eval_items(run, "test")
    base_images, base_res = _base_results(cache_dir, key, sample_base, test_prompts, test_seeds, "test: base",
                                          toy_world)
    if best["step"] == 0:
        tuned_images, tuned_res = base_images, base_res
    else:
        tuned_images = sample_tuned(train_dir / f"checkpoint-{best['step']}", test_prompts, test_seeds, "test: tuned")
        tuned_res = toy_world.score_many(tuned_images, test_prompts)
    wr, image_wr = paired_win_rates(test_prompts, base_res, tuned_res, run)
    timings["test"] = time.perf_counter() - t0
    with (Path(run.out) / "test_scores.jsonl").open("w") as fh:
        for p, s, b, t in zip(test_prompts, test_seeds, base_res, tuned_res):
            fh.write(json.dumps({"prompt": p, "seed": s, "base": b.to_dict(), "tuned": t.to_dict()}) + "\n")
    return Selection(val_curve, best["step"], checkpoints, test_prompts, test_seeds, base_res, tuned_res,
                     base_images, tuned_images, wr, image_wr, timings)


def paired_win_rates(prompts: Sequence[str], base_res: Sequence[Any], tuned_res: Sequence[Any],
                     run: ToyRunConfig) -> tuple[Any, Any]:
    """(per caption, per image) paired win rates of tuned over base (ties half) with 95% bootstrap intervals over
    the captions: per caption compares each caption's mean reward over its seeds (`caption_win_rate`), per image
    each item."""
    from diffusion_po.eval.stats import paired_win_rate

    per_image = paired_win_rate([r.reward for r in tuned_res], [r.reward for r in base_res], groups=list(prompts),
                                n_boot=run.n_boot, seed=run.eval_seed, tie_tol=run.tie_tol)
    return caption_win_rate(prompts, base_res, tuned_res, run), per_image


def caption_win_rate(prompts: Sequence[str], base_res: Sequence[Any], tuned_res: Sequence[Any], run: ToyRunConfig,
                     first: int | None = None) -> Any:
    """The paired win rate of tuned over base on each caption's mean reward over its seeds (with `first`: its
    first `first` seeds), ties half, with its 95% bootstrap interval over the captions."""
    from diffusion_po.eval.stats import paired_win_rate

    captions, tuned_means = caption_means(prompts, [r.reward for r in tuned_res], first)
    _, base_means = caption_means(prompts, [r.reward for r in base_res], first)
    return paired_win_rate(tuned_means, base_means, groups=captions, n_boot=run.n_boot, seed=run.eval_seed,
                           tie_tol=run.tie_tol)


def remove_checkpoints(run: ToyRunConfig, selection: Selection) -> None:
    """Delete the run's training checkpoints unless `run.keep_checkpoints`."""
    if not run.keep_checkpoints:
        for c in selection.checkpoints:
            shutil.rmtree(c, ignore_errors=True)


def prepare_run(run: ToyRunConfig) -> tuple[Path, Path, Any]:
    """The start of every toy run: the thread count, the output folder, the base model (its folder and the
    loaded pipeline)."""
    import torch

    from diffusion_po.toy.build import ensure_base

    if run.threads:
        torch.set_num_threads(run.threads)
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    base_path = ensure_base(run.model, world_name=run.world)
    return out, base_path, toy_pairs.load_pipeline(base_path)


def run_toy_dpo(run: ToyRunConfig) -> dict[str, Any]:
    """The whole main job; returns the results dictionary (also written to `out/results.json`)."""
    import torch


    started = time.perf_counter()
    timings: dict[str, float] = {}
    out, base_path, base = prepare_run(run)

    # 1. preference pairs from the base model on train prompts
    t0 = time.perf_counter()
    if run.pairs_file:
        pairs_file = Path(run.pairs_file)
        summary = toy_pairs.summarize_pairs(pairs_file)
    else:
        pairs_file = out / "pairs.parquet"
        summary = sample_pairs(run, base, pairs_file)
    timings["pairs"] = time.perf_counter() - t0

    # 2. Diffusion-DPO through the shared trainer
    t0 = time.perf_counter()
    train_dir = out / "train"
    cfg = train_stage(run, base_path, pairs_file, train_dir)
    timings["train"] = time.perf_counter() - t0

    # 3. early stopping on the validation prompts, 4. the test: base vs the chosen model, same seeds
    def sample_checkpoint(c: Path, prompts: list[str], seeds: list[int], desc: str) -> list[Any]:
        return sampler(toy_pairs.with_unet(base, *checkpoint_model(c)), run)(prompts, seeds, desc)

    sel = choose_and_test(run, train_dir, sampler(base, run), sample_checkpoint)
    timings.update(sel.timings_s)
    with (out / "val.jsonl").open("w") as fh:
        for row in sel.val_curve:
            fh.write(json.dumps(row) + "\n")
    if sel.best_step != 0:
        chosen = train_dir / f"checkpoint-{sel.best_step}"
        unet_dir, _ = checkpoint_model(chosen)
        final = out / "tuned"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(chosen / "unet" if unet_dir else chosen, final / ("unet" if unet_dir else ""),
                        ignore=shutil.ignore_patterns("*.bin", "*.pkl", "optimizer*", "random_states*", "scheduler*"))
    remove_checkpoints(run, sel)
    base_res, tuned_res, test_prompts = sel.base_results, sel.tuned_results, sel.test_prompts
    base_r = [r.reward for r in base_res]
    tuned_r = [r.reward for r in tuned_res]
    metrics = read_metrics(train_dir / "metrics.jsonl")
    plot_curves(metrics, sel.val_curve, out / "curves.png")
    shown = list(range(0, len(test_prompts), run.test_seeds))[: run.grid_prompts]  # each caption's first seed
    save_grid([test_prompts[i] for i in shown], [sel.base_images[i] for i in shown],
              [sel.tuned_images[i] for i in shown], [base_r[i] for i in shown], [tuned_r[i] for i in shown],
              out / "grid.png")
    timings["total"] = time.perf_counter() - started

    toy_world = get_world(run.world)
    results = {
        "world": toy_world.name,
        **summarize_test(toy_world, sel, run),
        "chosen_step": sel.best_step,
        "val_curve": sel.val_curve,
        "pairs": summary.to_dict(),
        "train_config": _cfg_summary(cfg),
        "run": asdict(run),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "threads": torch.get_num_threads(),
        "final_train_metrics": metrics[-1] if metrics else {},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, out / "report.md")
    return results


def summarize_test(toy_world: ToyWorld, sel: Selection, run: ToyRunConfig) -> dict[str, Any]:
    """The test's entries of a run's results.json: both win rates, base and tuned (the oracle's summary, the mean
    reward over captions with its interval), the paired gains, the test's sizes."""
    prompts = sel.test_prompts

    def side(results: list[Any]) -> dict[str, Any]:
        return {**toy_world.summarize(results), "reward": mean_ci(caption_means(prompts, [r.reward for r in results])[1],
                                                                  run)}

    fewer = [k for k in (1, 2, 4, 8, 16, 32) if k < run.test_seeds]  # the same test with fewer images per caption
    by_seeds = {str(k): caption_win_rate(prompts, sel.base_results, sel.tuned_results, run, k).to_dict()
                for k in fewer}
    return {"win_rate": sel.win_rate.to_dict(), "win_rate_per_image": sel.image_win_rate.to_dict(),
            "win_rate_by_test_seeds": {**by_seeds, str(run.test_seeds): sel.win_rate.to_dict()},
            "base": side(sel.base_results), "tuned": side(sel.tuned_results),
            **paired_gains(toy_world, sel.base_results, sel.tuned_results, run, prompts),
            "n_test_prompts": len(set(prompts)), "n_test_items": len(prompts), "test_seeds": run.test_seeds}


def paired_gains(toy_world: ToyWorld, base_res: list[Any], tuned_res: list[Any], run: ToyRunConfig,
                 prompts: Sequence[str] | None = None) -> dict[str, Any]:
    """The paired gains of tuned over base on the same test items, each a mean over captions (of each caption's
    mean over its seeds; `prompts` None: every item its own caption) with its 95% bootstrap interval:
    `reward_gain` (oracle reward) and `accuracy_gain` (the world's caption accuracy, `ToyWorld.accuracy`)."""
    keys = list(prompts) if prompts is not None else list(range(len(base_res)))
    reward = [t.reward - b.reward for t, b in zip(tuned_res, base_res, strict=True)]
    accuracy = [toy_world.accuracy(t) - toy_world.accuracy(b) for t, b in zip(tuned_res, base_res, strict=True)]
    return {"reward_gain": mean_ci(caption_means(keys, reward)[1], run),
            "accuracy_gain": mean_ci(caption_means(keys, accuracy)[1], run)}


def mean_ci(values: list[float], run: ToyRunConfig) -> dict[str, float]:
    """The mean of `values` with its 95% bootstrap interval (the run's resamples and seed)."""
    from diffusion_po.eval.stats import bootstrap_mean_ci

    return bootstrap_mean_ci(values, n_boot=run.n_boot, seed=run.eval_seed).to_dict()


def _cfg_summary(cfg: Any) -> dict[str, Any]:
    keys = ("method", "learning_rate", "train_batch_size", "max_train_steps", "use_lora", "rank",
            "checkpointing_steps", "seed")
    return {**{k: getattr(cfg, k) for k in keys}, **cfg.method_options}  # beta_dpo, sft_weight, ...


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _smooth(values: list[float], k: int = 10) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if len(arr) < k:
        return arr
    kernel = np.ones(k) / k
    return np.convolve(arr, kernel, mode="valid")


def plot_curves(metrics: list[dict[str, float]], val_curve: list[dict[str, float]], path: Path) -> None:
    """Loss, implicit accuracy (training batches) and validation reward against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    steps = [m["step"] for m in metrics]
    for ax, key, title in ((axes[0], "loss", "DPO loss"), (axes[1], "implicit_acc", "implicit accuracy")):
        vals = [m.get(key, np.nan) for m in metrics]
        ax.plot(steps, vals, alpha=0.3, color="C0")
        sm = _smooth(vals)
        if len(sm) != len(vals):
            ax.plot(steps[len(steps) - len(sm):], sm, color="C0")
        ax.set_title(title)
        ax.set_xlabel("step")
    if metrics:
        axes[0].axhline(float(np.log(2)), color="grey", ls=":", lw=1)
        axes[1].axhline(0.5, color="grey", ls=":", lw=1)
    axes[2].plot([r["step"] for r in val_curve], [r["reward"] for r in val_curve], "o-", color="C2")
    axes[2].axhline(val_curve[0]["reward"], color="grey", ls=":", lw=1)
    best = max(val_curve, key=lambda r: r["reward"])
    axes[2].plot([best["step"]], [best["reward"]], "*", ms=14, color="C3")
    axes[2].set_title("validation oracle reward (* chosen)")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_grid(prompts: list[str], base: list, tuned: list, base_r: list[float], tuned_r: list[float],
              path: Path) -> None:
    """Base (top row) and tuned (bottom row) samples with the same seeds, with their oracle rewards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(prompts)
    fig, axes = plt.subplots(2, n, figsize=(1.45 * n, 3.6), squeeze=False)
    for j in range(n):
        for i, (imgs, rs, name) in enumerate(((base, base_r, "base"), (tuned, tuned_r, "tuned"))):
            ax = axes[i][j]
            ax.imshow(np.asarray(imgs[j]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{rs[j]:.2f}", fontsize=7, labelpad=1)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
        axes[0][j].set_title("\n".join(_wrap(prompts[j], 18)), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + [cur]


def _by_seeds_lines(by_seeds: dict[str, dict[str, Any]]) -> list[str]:
    """The report's table of the per-caption win rate with each caption's first k images (k = 1, 2, 4, ...)."""
    if len(by_seeds) < 2:
        return []
    return ["The same test with fewer images per caption (each caption's first k):", "",
            "| images per caption | win rate [95% CI] | wins / ties / losses |", "|---|---|---|",
            *[f"| {k} | {w['win_rate']:.3f} [{w['lo']:.3f}, {w['hi']:.3f}] | {w['wins']} / {w['ties']} / {w['losses']} |"
              for k, w in by_seeds.items()], ""]


def write_report(results: dict[str, Any], path: Path) -> None:
    wr = results["win_rate"]
    iwr = results.get("win_rate_per_image", wr)
    seeds = results.get("test_seeds", 1)
    b, t = results["base"], results["tuned"]
    tc = results["train_config"]
    verdict = "above" if wr["lo"] > 0.5 else "not above"
    lines = [
        f"# Toy world ({results.get('world', 'simple')}): Diffusion-DPO",
        "",
        f"Diffusion-DPO ({'LoRA r=' + str(tc['rank']) if tc['use_lora'] else 'full fine-tune'}, beta_dpo "
        f"{tc['beta_dpo']:g}, lr {tc['learning_rate']:g}, batch {tc['train_batch_size']} pairs, "
        f"{tc['max_train_steps']} steps) on {results['pairs']['rows']} oracle-labelled pairs sampled from the toy "
        f"base model; checkpoint chosen on validation reward: step {results['chosen_step']}.",
        "",
        f"**Paired win rate of tuned over base: {wr['win_rate']:.3f} [95% CI {wr['lo']:.3f}, {wr['hi']:.3f}]** "
        f"over {wr['n']} held-out test captions, each caption's mean reward over its {seeds} seed(s), the same "
        f"seeds for both ({wr['wins']} wins, {wr['ties']} ties, {wr['losses']} losses); the interval is {verdict} "
        "0.5.",
        "",
        f"Image against image (the {results['n_test_items']} test images of each model, same seeds): "
        f"{iwr['win_rate']:.3f} [{iwr['lo']:.3f}, {iwr['hi']:.3f}] ({iwr['wins']} wins, {iwr['ties']} ties, "
        f"{iwr['losses']} losses).",
        "",
        *_by_seeds_lines(results.get("win_rate_by_test_seeds", {})),
        "| | base | tuned |",
        "|---|---|---|",
        f"| mean oracle reward | {b['reward']['value']:.4f} [{b['reward']['lo']:.4f}, {b['reward']['hi']:.4f}] | "
        f"{t['reward']['value']:.4f} [{t['reward']['lo']:.4f}, {t['reward']['hi']:.4f}] |",
    ]
    toy_world = get_world(results.get("world", "simple"))
    for key, name in toy_world.report_parts:
        if key in b:
            lines.append(f"| {name} | {b[key]:.3f} | {t[key]:.3f} |")
    rg, ag = results["reward_gain"], results["accuracy_gain"]
    accuracy = dict(toy_world.report_parts)[toy_world.accuracy_key]
    lines += [
        "",
        f"Paired gains over the test captions (each caption's mean over its seeds; 95% bootstrap intervals): reward {rg['value']:+.4f} "
        f"[{rg['lo']:+.4f}, {rg['hi']:+.4f}]; accuracy ({accuracy}) {100 * ag['value']:+.1f} points "
        f"[{100 * ag['lo']:+.1f}, {100 * ag['hi']:+.1f}].",
        "",
        "Validation reward by checkpoint (step 0 = base):",
        "",
        "| step | reward | " + " | ".join(toy_world.curve_keys) + " |",
        "|---|---|" + "---|" * len(toy_world.curve_keys),
    ]
    for r in results["val_curve"]:
        lines.append(f"| {r['step']} | {r['reward']:.4f} | " + " | ".join(f"{r[k]:.3f}" for k in toy_world.curve_keys)
                     + " |")
    p = results["pairs"]
    lines += [
        "",
        f"Pairs: {p['rows']} ({p['ties']} ties dropped), mean reward {p['mean_reward']:.3f}, mean |margin| "
        f"{p['mean_margin']:.3f}, label agreement with the oracle {p['oracle_agreement']:.3f}.",
        "",
        "![base vs tuned](grid.png)",
        "",
        "![curves](curves.png)",
        "",
        f"Timings (s, {results['threads']} threads): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()),
        "",
    ]
    path.write_text("\n".join(lines))


__all__ = ["DEFAULTS_CONFIG", "Selection", "ToyRunConfig", "caption_means", "checkpoint_model", "choose_and_test",
           "caption_win_rate", "eval_items", "evaluate", "paired_gains", "paired_win_rates", "plot_curves", "remove_checkpoints",
           "run_toy_dpo", "sampler", "save_grid", "summarize_test", "trainer_config", "write_report"]
