"""The methods of docs/methods.md in the toy world, with the main job's protocol
(`diffusion_po.toy.experiment.choose_and_test`): oracle-labelled pairs sampled from the toy base on train
prompts, training through the shared trainer, the checkpoint chosen on validation prompts (step 0 = the base
competes), then a paired win rate with a 95% bootstrap interval on held-out test prompts with fixed seeds.

    diffusion-po toy method dcpo|mapo|kto|sft|robust_dpo|dpo_sft|dpo   [--out runs/toy_METHOD] [--pairs 1000]
    diffusion-po toy method dro        # experts = top images of the pair samples by the oracle
    diffusion-po toy method npo        # negative model; NPO guidance vs plain CFG
    diffusion-po toy method self_npo   # prompts only; the student as NPO's negative model vs plain CFG
    diffusion-po toy method curated|online_dpo   # prompts only; each round samples and scores its own data
    diffusion-po toy table runs/toy_*  # a markdown table of finished runs
    diffusion-po toy scales --scales 1,2,4,8   # plain CFG's validation reward per guidance scale
    diffusion-po toy shift runs/toy_self_npo/train/checkpoint-450   # how a negative model moves eps(∅)

Every method trains with the shipped `configs/toy_METHOD.yaml` (where there is one) over `configs/toy_dpo.yaml`.
`--pairs-file` reuses a pairs parquet of an earlier run (same base, same --pairs), and `--cache-dir` keeps
the base model's validation/test samples' rewards, so a sweep over methods samples them once. Each run
writes `results.json` and `report.md` in its folder; `timings_s.train` is the training wall time.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusion_po.toy.online import ONLINE_METHODS

if TYPE_CHECKING:  # the toy world's modules load when a function runs: the CLI lists METHODS without them
    from diffusion_po.toy.experiment import ToyRunConfig

#: methods trained on the toy pairs and compared with the base under plain CFG
PAIRED = ("dpo", "dcpo", "mapo", "kto", "sft", "robust_dpo", "dpo_sft")
#: methods whose result is the negative branch of NPO guidance (compared with the base's plain CFG)
NEGATIVE = ("npo", "self_npo")
#: online methods (`toy.online`): prompts only (the train split's captions); each round samples K images per
#: prompt from the current model, labelled by the world's oracle (`reward.name` = the world's `scorer_metric`)
ONLINE = ONLINE_METHODS
#: methods whose data is the train split's captions
PROMPTS_ONLY = ("self_npo", *ONLINE)
METHODS = (*PAIRED, "dro", *NEGATIVE, *ONLINE)
#: methods without a toy config of their own: `method=` and these keys over configs/toy_dpo.yaml
EXTRA_KEYS = {"sft": [], "robust_dpo": ["label_smoothing=0.1"], "dpo_sft": ["sft_weight=1.0"]}


def method_config(method: str) -> str | None:
    """The shipped `toy_METHOD` config of a method, or None where the method has none."""
    from diffusion_po.shipped import config_names, config_path

    name = f"toy_{method}"
    return str(config_path(name)) if name in config_names() else None


def method_run(method: str, run: ToyRunConfig) -> ToyRunConfig:
    """`run` as `method` trains: its shipped `toy_METHOD` config (unless `run.config` names one) and the method's
    fixed keys before `run.overrides` (EXTRA_KEYS; for the online methods the world's oracle as the reward and
    the evaluation's sampler settings for their samples)."""
    from diffusion_po.toy.worlds import get_world

    fixed = [f"method={method}", *EXTRA_KEYS[method]] if method in EXTRA_KEYS else []
    if method in ONLINE:
        fixed += [f"method_options.reward.name={get_world(run.world).scorer_metric}",
                  f"method_options.sampler_steps={run.steps}", f"method_options.guidance_scale={run.scale}"]
    return replace(run, config=run.config or method_config(method), overrides=[*fixed, *run.overrides])


def run_method(method: str, run: ToyRunConfig, pairs_file: str | None = None, cache_dir: str | None = None,
               experts: int | None = None, images: str | None = None) -> dict[str, Any]:
    """Data (pairs, experts or prompts) -> training -> validation -> test, for one method."""
    import torch

    from diffusion_po.data.experts import select_top_experts
    from diffusion_po.guidance import NPO
    from diffusion_po.sampling import generate
    from diffusion_po.sampling.negative import load_negative_network, load_npo_lora
    from diffusion_po.toy import pairs as toy_pairs
    from diffusion_po.toy.experiment import (
        checkpoint_model,
        choose_and_test,
        prepare_run,
        remove_checkpoints,
        sample_pairs,
        sampler,
        summarize_test,
        train_stage,
    )
    from diffusion_po.toy.worlds import get_world

    started = time.perf_counter()
    timings: dict[str, float] = {}
    run = method_run(method, run)
    out, base_path, base = prepare_run(run)
    toy_world = get_world(run.world)

    t0 = time.perf_counter()
    data_info: dict[str, Any] = {}
    if method not in PROMPTS_ONLY:
        target = out / "pairs.parquet"
        if pairs_file:
            shutil.copyfile(pairs_file, target)
            data_info["pairs"] = {"reused": str(pairs_file)}
        else:
            data_info["pairs"] = sample_pairs(run, base, target).to_dict()
        data_file = target
    if method == "dro":
        top = experts or max(32, run.n_pairs // 4)
        data_file = select_top_experts([str(target)], lambda ims, ps: [r.reward for r in toy_world.score_many(ims, ps)],
                                       top, out / "experts", progress=False)
        data_info["experts"] = json.loads((out / "experts" / "selection.json").read_text())
    if method == "self_npo" and images:  # Self-NPO from images (the reference's mode), an experts.jsonl
        data_file = Path(images)
        run.overrides = ["data.format=images", *run.overrides]
        data_info["images"] = str(images)
    elif method in PROMPTS_ONLY:
        data_file = out / "prompts.txt"
        data_file.write_text("\n".join(toy_world.split_captions("train")) + "\n")
        data_info["prompts"] = len(toy_world.split_captions("train"))
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_dir = out / "train"
    cfg = train_stage(run, base_path, data_file, train_dir)
    timings["train"] = time.perf_counter() - t0

    if method not in NEGATIVE:
        def sample_tuned(ckpt_dir: Path, prompts: list[str], seeds: list[int], desc: str) -> list[Any]:
            return sampler(toy_pairs.with_unet(base, *checkpoint_model(ckpt_dir)), run)(prompts, seeds, desc)
        label = "tuned vs base (CFG)"
    else:
        def sample_tuned(ckpt_dir: Path, prompts: list[str], seeds: list[int], desc: str) -> list[Any]:
            pipe = toy_pairs.with_unet(base)
            if (ckpt_dir / "pytorch_lora_weights.safetensors").is_file():
                neg = load_npo_lora(pipe, ckpt_dir)
            else:
                neg = load_negative_network(pipe, ckpt_dir)
            return generate(pipe, list(prompts), seeds=list(seeds), guidance=NPO(run.scale), negative_model=neg,
                            steps=run.steps, batch_size=run.batch_size, scheduler=toy_pairs.DEFAULT_SCHEDULER,
                            progress=True)
        label = "NPO guidance (base + negative model) vs plain CFG (base)"
    t0 = time.perf_counter()
    sel = choose_and_test(run, train_dir, sampler(base, run), sample_tuned, Path(cache_dir) if cache_dir else None,
                          str(Path(base_path).resolve()))
    remove_checkpoints(run, sel)
    timings["evaluation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    results = {"world": toy_world.name, "comparison": label, **summarize_test(toy_world, sel, run),
               "chosen_step": sel.best_step, "val_curve": sel.val_curve}
    results.update(method=method, data=data_info, run=asdict(run), threads=torch.get_num_threads(),
                   timings_s={k: round(v, 1) for k, v in timings.items()},
                   train_config={k: getattr(cfg, k) for k in ("method", "learning_rate", "train_batch_size",
                                                               "max_train_steps", "use_lora", "method_options")})
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_report(results, out / "report.md")
    return results


def write_report(results: dict[str, Any], path: Path) -> None:
    """report.md of a method run: the win rate, the paired gain, the validation curve."""
    wr = results["win_rate"]
    verdict = "above" if wr["lo"] > 0.5 else "not above"
    lines = [
        f"# Toy world: {results['method']}", "",
        f"{results['comparison']}: **paired win rate {wr['win_rate']:.3f} [95% CI {wr['lo']:.3f}, {wr['hi']:.3f}]** "
        f"over {wr['n']} held-out test captions (each the mean over {results.get('test_seeds', 1)} seed(s), fixed "
        f"seeds); {verdict} 0.5. "
        f"Checkpoint chosen on validation: step {results['chosen_step']}.", "",
        f"Mean oracle reward: base {results['base']['reward']['value']:.4f}, tuned {results['tuned']['reward']['value']:.4f}; "
        f"paired gain {results['reward_gain']['value']:+.4f} [95% CI {results['reward_gain']['lo']:+.4f}, "
        f"{results['reward_gain']['hi']:+.4f}].",
        "", "| step | validation reward |", "|---|---|",
        *[f"| {r['step']} | {r['reward']:.4f} |" for r in results["val_curve"]],
        "", f"Timings (s, {results['threads']} threads): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()), "",
    ]
    path.write_text("\n".join(lines))


def _value(x: Any) -> float:
    return float(x["value"]) if isinstance(x, dict) else float(x)


def reward_gain(folder: Path, n_boot: int = 2000, seed: int = 1234) -> dict[str, float] | None:
    """Mean paired reward gain (tuned - base) with its bootstrap interval, from a run's test_scores.jsonl."""
    from diffusion_po.eval.stats import bootstrap_mean_ci

    f = folder / "test_scores.jsonl"
    if not f.is_file():
        return None
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return bootstrap_mean_ci([r["tuned"]["reward"] - r["base"]["reward"] for r in rows], n_boot=n_boot,
                             seed=seed).to_dict()


def table(folders: Sequence[str | Path]) -> str:
    """A markdown table of finished runs (main job or method runs; folders without results.json are skipped)."""
    rows = ["| method | comparison | win rate [95% CI] | reward base → tuned | paired gain [95% CI] | chosen step "
            "| train time (s) |", "|---|---|---|---|---|---|---|"]
    for folder in folders:
        f = Path(folder) / "results.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        method = r.get("method") or r.get("train_config", {}).get("method", Path(folder).name)
        wr = r["win_rate"]
        gain = r.get("reward_gain") or reward_gain(Path(folder))
        gain_text = f"{gain['value']:+.4f} [{gain['lo']:+.4f}, {gain['hi']:+.4f}]" if gain else "–"
        rows.append(f"| {method} | {r.get('comparison', 'tuned vs base (CFG)')} | {wr['win_rate']:.3f} "
                    f"[{wr['lo']:.3f}, {wr['hi']:.3f}] | {_value(r['base']['reward']):.4f} → "
                    f"{_value(r['tuned']['reward']):.4f} | {gain_text} | {r['chosen_step']} "
                    f"| {r['timings_s'].get('train', '')} |")
    return "\n".join(rows)


def scale_sweep(scales: list[float], model: str | None = None, n_val: int = 152, eval_seed: int = 1234,
                steps: int | None = None, batch_size: int = 64) -> list[dict[str, float]]:
    """Plain CFG's mean oracle reward (and its parts) on the validation captions, per guidance scale.

    Same captions and seeds as the methods' validation, so it tells where the toy base's CFG scale sits
    relative to the reward's optimum (guidance methods are compared at `ToyRunConfig.scale`).
    """
    import numpy as np

    from diffusion_po.toy import pairs as toy_pairs
    from diffusion_po.toy.build import ensure_base
    from diffusion_po.toy.experiment import ToyRunConfig, eval_items, evaluate

    run = ToyRunConfig(world="simple", model=model, n_val=n_val, eval_seed=eval_seed,
                       steps=steps or toy_pairs.DEFAULT_STEPS, batch_size=batch_size)
    base = toy_pairs.load_pipeline(ensure_base(model, world_name="simple"))
    prompts, seeds = eval_items(run, "val")
    rows = []
    for scale in scales:
        _, res = evaluate(base, prompts, seeds, replace(run, scale=scale), f"CFG {scale:g}")
        row = {"scale": scale}
        row.update({k: float(np.mean([getattr(r, k) for r in res])) for k in ("reward", "colour", "shape", "clean")})
        rows.append(row)
    return rows


def guidance_shift(negative: str, model: str | None = None, n: int = 64, timesteps=(100, 300, 500, 700, 900),
                   seed: int = 0) -> list[dict[str, float]]:
    """How a negative model's unconditional prediction differs from the base's, per timestep.

    d = eps_neg(x, '') - eps_base(x, ''), D = eps_base(x, c) - eps_base(x, ''), on random x and validation
    captions. `k` = <d, D> / <D, D> is the part of d along CFG's own direction: NPO guidance with scale w
    equals plain CFG at scale w - k (w - 1) plus (w - 1) times the rest of d, so |k| << 1 means the negative
    model changes *what* guidance pushes away from, not how hard.
    """
    import torch

    from diffusion_po.sampling.negative import load_negative_network
    from diffusion_po.toy import pairs as toy_pairs
    from diffusion_po.toy import world
    from diffusion_po.toy.build import ensure_base

    base = toy_pairs.load_pipeline(ensure_base(model, world_name="simple"))
    net = base.unet.float().eval()
    neg = load_negative_network(base, negative).network
    prompts = world.held_out_prompts(n, seed, split="val")
    tok = base.tokenizer([*prompts, ""], padding="max_length", max_length=base.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        emb = base.text_encoder(tok.input_ids)[0]
        cond, empty = emb[:-1], emb[-1:].expand(n, -1, -1)
        size = net.config.sample_size
        for t in timesteps:
            x = torch.randn(n, net.config.in_channels, size, size, generator=gen)
            tt = torch.full((n,), int(t))
            uncond = net(x, tt, empty).sample
            big_d = net(x, tt, cond).sample - uncond
            d = neg(x, tt, empty).sample - uncond
            k = float((d * big_d).sum() / (big_d * big_d).sum())
            cos = float((d * big_d).sum() / (d.norm() * big_d.norm()).clamp(min=1e-12))
            rows.append({"t": int(t), "k": k, "cos": cos, "norm_d": float(d.norm()), "norm_D": float(big_d.norm())})
    return rows


__all__ = ["METHODS", "NEGATIVE", "ONLINE", "PAIRED", "PROMPTS_ONLY", "guidance_shift", "method_config", "method_run",
           "reward_gain", "run_method", "scale_sweep", "table", "write_report"]
