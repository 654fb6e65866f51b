"""Toy-world experiments for the methods of docs/methods.md, with the protocol of the DPO main job
(`diffusion-po toy run`): oracle-labelled pairs sampled from the toy base on train prompts, training through
the shared trainer, the checkpoint chosen on validation prompts (step 0 = the base competes), then a paired
win rate with a 95% bootstrap interval on held-out test prompts with fixed seeds.

    python scripts/toy_methods.py dcpo|mapo|kto|sft|robust_dpo|dpo_sft   [--out runs/toy_METHOD] [--pairs 1000]
    python scripts/toy_methods.py dro        # experts = top images of the pair samples by the oracle
    python scripts/toy_methods.py npo        # negative model; NPO guidance vs plain CFG
    python scripts/toy_methods.py self_npo   # prompts only; the student as NPO's negative model vs plain CFG
    python scripts/toy_methods.py table runs/toy_*   # a markdown table of finished runs
    python scripts/toy_methods.py scales --scales 1,2,4,8   # plain CFG's validation reward per guidance scale
    python scripts/toy_methods.py shift runs/toy_self_npo/train/checkpoint-450   # how a negative model moves eps(∅)

Every method trains with `configs/toy_METHOD.yaml` over the main job's defaults (`TOY_DPO_DEFAULTS`).
`--pairs-file` reuses a pairs parquet of an earlier run (same base, same --pairs), and `--cache-dir` keeps
the base model's validation/test samples' rewards, so a sweep over methods samples them once. Each run
writes `results.json` and `report.md` in its folder; `timings_s.train` is the training wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAIRED = ("dcpo", "mapo", "kto", "sft", "robust_dpo", "dpo_sft")
EXTRA_KEYS = {"robust_dpo": ["label_smoothing=0.1"], "dpo_sft": ["sft_weight=1.0"]}


def _config(method: str) -> str | None:
    path = ROOT / "configs" / f"toy_{method}.yaml"
    return str(path) if path.is_file() else None


def _cached_base(cache_dir: Path | None, key: dict[str, Any], compute):
    """Oracle results of the base model's samples, cached on disk by (model, prompts, seeds, sampler)."""
    import hashlib

    from diffusion_po.toy import oracle

    if cache_dir is None:
        return compute()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"base-{digest}.json"
    if path.is_file():
        return [oracle.OracleResult(**d, shapes=[]) for d in json.loads(path.read_text())]
    res = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_dict() for r in res]))
    return res


def _choose_and_test(run: Any, base: Any, train_dir: Path, out: Path, sample_tuned, sample_base,
                     label: str, cache_dir: Path | None = None, base_id: str = "") -> dict[str, Any]:
    """Validation over checkpoints (step 0 = sample_base), then the test of the best against sample_base."""
    import numpy as np

    from diffusion_po.eval.stats import bootstrap_mean_ci, paired_win_rate
    from diffusion_po.toy import oracle
    from diffusion_po.toy.experiment import eval_items
    from diffusion_po.training import checkpoint as ckpt

    val_prompts, val_seeds = eval_items(run, "val")
    key = {"model": base_id, "steps": run.steps, "scale": run.scale}
    base_val = _cached_base(cache_dir, {**key, "prompts": val_prompts, "seeds": val_seeds},
                            lambda: oracle.score_many(sample_base(val_prompts, val_seeds, "validation: base"), val_prompts))
    curve = [{"step": 0, "reward": float(np.mean([r.reward for r in base_val]))}]
    checkpoints = ckpt.list_checkpoints(train_dir)
    for c in checkpoints:
        res = oracle.score_many(sample_tuned(c, val_prompts, val_seeds, f"validation: step {ckpt.step_of(c)}"),
                                val_prompts)
        curve.append({"step": ckpt.step_of(c), "reward": float(np.mean([r.reward for r in res]))})
    best = max(curve, key=lambda r: r["reward"])
    test_prompts, test_seeds = eval_items(run, "test")
    base_res = _cached_base(cache_dir, {**key, "prompts": test_prompts, "seeds": test_seeds},
                            lambda: oracle.score_many(sample_base(test_prompts, test_seeds, "test: base"), test_prompts))
    if best["step"] == 0:
        tuned_res = base_res
    else:
        chosen = train_dir / f"checkpoint-{best['step']}"
        tuned_res = oracle.score_many(sample_tuned(chosen, test_prompts, test_seeds, "test: tuned"), test_prompts)
    base_r, tuned_r = [r.reward for r in base_res], [r.reward for r in tuned_res]
    wr = paired_win_rate(tuned_r, base_r, n_boot=run.n_boot, seed=run.eval_seed, tie_tol=run.tie_tol,
                         groups=test_prompts)
    with (out / "test_scores.jsonl").open("w") as fh:
        for p, s, b, t in zip(test_prompts, test_seeds, base_res, tuned_res):
            fh.write(json.dumps({"prompt": p, "seed": s, "base": b.to_dict(), "tuned": t.to_dict()}) + "\n")
    if not run.keep_checkpoints:
        for c in checkpoints:
            shutil.rmtree(c, ignore_errors=True)

    def stat(v: list[float]) -> dict[str, float]:
        return bootstrap_mean_ci(v, n_boot=run.n_boot, seed=run.eval_seed).to_dict()

    return {"win_rate": wr.to_dict(), "comparison": label, "base": {"reward": stat(base_r)},
            "tuned": {"reward": stat(tuned_r)}, "reward_gain": stat([t - b for t, b in zip(tuned_r, base_r)]),
            "chosen_step": best["step"], "val_curve": curve,
            "n_test_items": len(test_prompts), "n_test_prompts": len(set(test_prompts))}


def run_method(method: str, run: Any, pairs_file: str | None = None, cache_dir: str | None = None,
               experts: int | None = None, images: str | None = None) -> dict[str, Any]:
    """Data (pairs, experts or prompts) -> training -> validation -> test, for one method."""
    import torch

    from diffusion_po.data.experts import select_top_experts
    from diffusion_po.guidance import CFG, NPO
    from diffusion_po.sampling import generate
    from diffusion_po.sampling.negative import load_negative_network, load_npo_lora
    from diffusion_po.toy import oracle, world
    from diffusion_po.toy import pairs as toy_pairs
    from diffusion_po.toy.build import ensure_base
    from diffusion_po.toy.experiment import checkpoint_model, sample_pairs, train_stage

    started = time.perf_counter()
    timings: dict[str, float] = {}
    if run.threads:
        torch.set_num_threads(run.threads)
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    base_path = ensure_base(run.model)
    base = toy_pairs.load_pipeline(base_path)
    run.config = run.config or _config(method)
    if method in ("sft", "robust_dpo", "dpo_sft"):
        run.overrides = [f"method={method}", *EXTRA_KEYS.get(method, []), *run.overrides]

    t0 = time.perf_counter()
    data_info: dict[str, Any] = {}
    if method != "self_npo":
        target = out / "pairs.parquet"
        if pairs_file:
            shutil.copyfile(pairs_file, target)
            data_info["pairs"] = {"reused": str(pairs_file)}
        else:
            data_info["pairs"] = sample_pairs(run, base, target).to_dict()
        data_file = target
    if method == "dro":
        top = experts or max(32, run.n_pairs // 4)
        data_file = select_top_experts([str(target)], lambda ims, ps: [oracle.reward(i, p) for i, p in zip(ims, ps)],
                                       top, out / "experts", progress=False)
        data_info["experts"] = json.loads((out / "experts" / "selection.json").read_text())
    if method == "self_npo" and images:  # Self-NPO from images (the reference's mode), an experts.jsonl
        data_file = Path(images)
        run.overrides = ["data.format=images", *run.overrides]
        data_info["images"] = str(images)
    elif method == "self_npo":
        data_file = out / "prompts.txt"
        data_file.write_text("\n".join(world.split_captions("train")) + "\n")
        data_info["prompts"] = len(world.split_captions("train"))
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_dir = out / "train"
    cfg = train_stage(run, base_path, data_file, train_dir)
    timings["train"] = time.perf_counter() - t0

    def sample_cfg(prompts, seeds, desc):
        return toy_pairs.sample(base, prompts, seeds, run.steps, run.scale, run.batch_size, progress=True, desc=desc)

    if method not in ("npo", "self_npo"):
        def sample_tuned(ckpt_dir, prompts, seeds, desc):
            pipe = toy_pairs.with_unet(base, *checkpoint_model(ckpt_dir))
            return toy_pairs.sample(pipe, prompts, seeds, run.steps, run.scale, run.batch_size, progress=True, desc=desc)
        label = "tuned vs base (CFG)"
    else:
        def sample_tuned(ckpt_dir, prompts, seeds, desc):
            pipe = toy_pairs.with_unet(base)
            if (ckpt_dir / "pytorch_lora_weights.safetensors").is_file():
                neg = load_npo_lora(pipe, ckpt_dir)
            else:
                neg = load_negative_network(pipe, ckpt_dir)
            return generate(pipe, list(prompts), seeds=list(seeds), guidance=NPO(run.scale), negative_model=neg,
                            steps=run.steps, batch_size=run.batch_size, scheduler=toy_pairs.DEFAULT_SCHEDULER,
                            progress=True)
        label = "NPO guidance (base + negative model) vs plain CFG (base)"
    _ = CFG  # plain CFG is toy_pairs.sample's guidance
    t0 = time.perf_counter()
    results = _choose_and_test(run, base, train_dir, out, sample_tuned, sample_cfg, label,
                               Path(cache_dir) if cache_dir else None, str(Path(base_path).resolve()))
    timings["evaluation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    results.update(method=method, data=data_info, run=asdict(run), threads=torch.get_num_threads(),
                   timings_s={k: round(v, 1) for k, v in timings.items()},
                   train_config={k: getattr(cfg, k) for k in ("method", "learning_rate", "train_batch_size",
                                                               "max_train_steps", "use_lora", "method_options")})
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_report(results, out / "report.md")
    return results


def write_report(results: dict[str, Any], path: Path) -> None:
    wr = results["win_rate"]
    verdict = "above" if wr["lo"] > 0.5 else "not above"
    lines = [
        f"# Toy world: {results['method']}", "",
        f"{results['comparison']}: **paired win rate {wr['win_rate']:.3f} [95% CI {wr['lo']:.3f}, {wr['hi']:.3f}]** "
        f"over {wr['n']} held-out test items ({results['n_test_prompts']} captions, fixed seeds); {verdict} 0.5. "
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


def table(folders: list[str]) -> str:
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

    run = ToyRunConfig(model=model, n_val=n_val, eval_seed=eval_seed, steps=steps or toy_pairs.DEFAULT_STEPS,
                       batch_size=batch_size)
    base = toy_pairs.load_pipeline(ensure_base(model))
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

    base = toy_pairs.load_pipeline(ensure_base(model))
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


def main(argv: list[str] | None = None) -> int:
    from diffusion_po.toy.experiment import ToyRunConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["dpo", *PAIRED, "dro", "npo", "self_npo", "table", "scales", "shift"])
    p.add_argument("folders", nargs="*", help="(table) run folders; (shift) the negative model's folder")
    p.add_argument("--out", default=None)
    p.add_argument("--model", default=None, help="toy base folder (default: shipped or cached)")
    p.add_argument("--config", default=None, help="YAML over the toy defaults (default configs/toy_METHOD.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--val", type=int, default=152)
    p.add_argument("--test", type=int, default=263)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--pairs-file", default=None, help="reuse this pairs parquet instead of sampling new pairs")
    p.add_argument("--experts", type=int, default=None,
                   help="(dro) how many top images of the pair samples are the experts (default pairs / 4)")
    p.add_argument("--images", default=None,
                   help="(self_npo) train from these images (an experts.jsonl) instead of prompts only")
    p.add_argument("--cache-dir", default=None, help="cache the base model's validation/test rewards here")
    p.add_argument("--scales", default="1,1.5,2,3,4,5,6,8", help="(scales) comma-separated CFG scales")
    args = p.parse_args(argv)
    if args.method == "table":
        print(table(args.folders))
        return 0
    if args.method == "scales":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print("| CFG scale | reward | colour | shape | clean |\n|---|---|---|---|---|")
        for r in scale_sweep([float(x) for x in args.scales.split(",")], args.model, args.val):
            print(f"| {r['scale']:g} | {r['reward']:.4f} | {r['colour']:.4f} | {r['shape']:.4f} | {r['clean']:.4f} |")
        return 0
    if args.method == "shift":
        if len(args.folders) != 1:
            p.error("shift needs one folder: the negative model (a checkpoint, a training output or a unet folder)")
        print("| t | k (along CFG's direction) | cos | norm d | norm D |\n|---|---|---|---|---|")
        for r in guidance_shift(args.folders[0], args.model):
            print(f"| {r['t']} | {r['k']:.3f} | {r['cos']:.3f} | {r['norm_d']:.2f} | {r['norm_D']:.2f} |")
        return 0
    run = ToyRunConfig(out=args.out or f"runs/toy_{args.method}", model=args.model, config=args.config,
                       overrides=list(args.overrides), n_pairs=args.pairs, n_val=args.val, n_test=args.test,
                       threads=args.threads, keep_checkpoints=args.keep_checkpoints)
    res = run_method(args.method, run, args.pairs_file, args.cache_dir, args.experts, args.images)
    wr = res["win_rate"]
    print(f"{args.method}: win rate {wr['win_rate']:.3f} [{wr['lo']:.3f}, {wr['hi']:.3f}] (n={wr['n']}); "
          f"report in {run.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
