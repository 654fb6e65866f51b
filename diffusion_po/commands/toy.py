"""`diffusion-po toy`: the embedded toy world (build the base model, make pairs, run the main job, evaluate).

    diffusion-po toy run   [--out runs/toy_dpo] [--pairs 1000] [--config configs/toy_dpo.yaml] [--set key=value]
    diffusion-po toy build [--out DIR] [--seed 0] [--steps 3000] [--vae-steps 1200] [--images 40000]
    diffusion-po toy pairs --out pairs.parquet [--n 1000] [--seed 0] [--label-noise 0.1] [--model DIR]
    diffusion-po toy eval  [--model DIR] [--unet DIR | --lora DIR] [--n 263] [--out scores.jsonl]
    diffusion-po toy prompts --out prompts.txt [--split test] [--n 263]   # captions for `eval generate`
    diffusion-po toy base                                                 # prints the base model folder

With `toy prompts` and `toy base` the general eval flow runs on the toy world, offline, scored by the
oracle: `eval generate --model $(diffusion-po toy base) --prompts prompts.txt`, `eval score --metrics toy`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusion_po.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "toy", help="the toy world: a CPU-sized base model, oracle-labelled pairs, and the DPO main job",
        description="The embedded toy world (see docs/toy.md).",
    )
    verbs = parser.add_subparsers(dest="toy_verb", metavar="ACTION")

    p = verbs.add_parser("run", aliases=["dpo"], help="main job: pairs -> Diffusion-DPO -> evaluation report")
    p.add_argument("--out", default="runs/toy_dpo", help="run folder (default: runs/toy_dpo)")
    p.add_argument("--model", default=None, help="base pipeline folder (default: the shipped toy base)")
    p.add_argument("--config", default=None, help="YAML of trainer keys over the toy defaults (configs/toy_dpo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a trainer key, e.g. --set learning_rate=1e-6 (repeatable)")
    p.add_argument("--pairs", type=int, default=1000, help="number of preference pairs (train prompts)")
    p.add_argument("--pairs-file", default=None, help="train on this pairs parquet instead of sampling new pairs")
    p.add_argument("--pair-seed", type=int, default=0)
    p.add_argument("--label-noise", type=float, default=0.0, help="probability of flipping a pair's label")
    p.add_argument("--min-margin", type=float, default=0.0, help="pairs with a smaller reward gap become ties")
    p.add_argument("--val", type=int, default=152, help="validation items for early stopping")
    p.add_argument("--test", type=int, default=263, help="held-out test items (263 = every test caption once)")
    p.add_argument("--sample-steps", type=int, default=10, help="sampler steps (DPM-Solver++)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--tie-tol", type=float, default=1e-3, help="reward differences up to this count as ties")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.set_defaults(func=run_main)

    p = verbs.add_parser("build", help="pretrain the toy base model (a StableDiffusionPipeline folder)")
    p.add_argument("--out", default=None, help="output folder (default: a cache folder; prints its path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="UNet + text encoder steps (default 3000)")
    p.add_argument("--vae-steps", type=int, default=None, help="autoencoder steps (default 1200)")
    p.add_argument("--images", type=int, default=None, help="rendered training images (default 40000)")
    p.add_argument("--batch", type=int, default=None, help="UNet batch size (default 32)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--small", action="store_true", help="a reduced build for smoke tests (seconds)")
    p.set_defaults(func=run_build)

    p = verbs.add_parser("pairs", help="sample two images per prompt, label by the oracle, write Pick-a-Pic parquet")
    p.add_argument("--out", required=True, help="parquet file to write")
    p.add_argument("--model", default=None, help="pipeline folder to sample from (default: the shipped toy base)")
    p.add_argument("--n", type=int, default=1000, help="number of pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--label-noise", type=float, default=0.0)
    p.add_argument("--min-margin", type=float, default=0.0)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=run_pairs)

    p = verbs.add_parser("eval", help="oracle reward and caption-following accuracy of a toy model")
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped toy base)")
    p.add_argument("--unet", default=None, help="a fine-tuned UNet folder to swap in")
    p.add_argument("--lora", default=None, help="a folder with pytorch_lora_weights.safetensors")
    p.add_argument("--n", type=int, default=263)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--out", default=None, help="write per-image scores (jsonl)")
    p.add_argument("--grid", default=None, help="write a PNG grid of the first 32 samples")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=run_eval)

    p = verbs.add_parser("prompts", help="held-out toy captions as a prompt file for `eval generate`")
    p.add_argument("--out", required=True, help="prompt file to write (.txt, one caption a line)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--n", type=int, default=263, help="number of captions (263 = every test caption once)")
    p.add_argument("--seed", type=int, default=1234)
    p.set_defaults(func=run_prompts)

    p = verbs.add_parser("base", help="print the toy base model folder (shipped, or cached build)")
    p.set_defaults(func=run_base)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def _check_positive(**values: int | None) -> None:
    for name, v in values.items():
        if v is not None and v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")


def run_main(args: argparse.Namespace) -> int:
    from diffusion_po.toy.experiment import ToyRunConfig, run_toy_dpo

    _check_positive(pairs=args.pairs, val=args.val, test=args.test, sample_steps=args.sample_steps)
    if not 0.0 <= args.label_noise < 0.5:
        raise UserError(f"--label-noise must be in [0, 0.5), got {args.label_noise}")
    run = ToyRunConfig(out=args.out, model=args.model, config=args.config, overrides=args.overrides,
                       n_pairs=args.pairs, pair_seed=args.pair_seed, label_noise=args.label_noise,
                       min_margin=args.min_margin, n_val=args.val, n_test=args.test, steps=args.sample_steps,
                       scale=args.guidance, threads=args.threads, keep_checkpoints=args.keep_checkpoints,
                       pairs_file=args.pairs_file, tie_tol=args.tie_tol)
    if args.pairs_file and not Path(args.pairs_file).is_file():
        raise UserError(f"--pairs-file {args.pairs_file} does not exist")
    results = run_toy_dpo(run)
    wr = results["win_rate"]
    print(f"win rate of tuned over base: {wr['win_rate']:.3f} [{wr['lo']:.3f}, {wr['hi']:.3f}] over {wr['n']} "
          f"held-out prompts; mean reward base {results['base']['reward']['value']:.4f} -> tuned "
          f"{results['tuned']['reward']['value']:.4f}; total {results['timings_s']['total']:.0f}s")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from diffusion_po.toy.build import BuildConfig, build_base, cache_dir, is_pipeline_folder

    _check_positive(steps=args.steps, vae_steps=args.vae_steps, images=args.images, batch=args.batch,
                    threads=args.threads)
    cfg = BuildConfig.small(args.seed) if args.small else BuildConfig(seed=args.seed)
    for key, value in (("steps", args.steps), ("vae_steps", args.vae_steps), ("n_images", args.images),
                       ("batch", args.batch), ("threads", args.threads)):
        if value is not None:
            setattr(cfg, key, value)
    if args.out is None:
        import dataclasses
        import hashlib

        digest = hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]
        out = cache_dir() / f"base-seed{cfg.seed}-{digest}"
        if is_pipeline_folder(out):
            print(f"cached: {out}")
            return 0
    else:
        out = Path(args.out)
    build_base(out, cfg)
    print(out)
    return 0


def _set_threads(n: int | None) -> None:
    if n is not None:
        if n <= 0:
            raise UserError(f"--threads must be positive, got {n}")
        import torch

        torch.set_num_threads(n)


def _pipe(model: str | None, unet: str | None = None, lora: str | None = None):
    from diffusion_po.toy.build import ensure_base
    from diffusion_po.toy.pairs import load_pipeline

    return load_pipeline(ensure_base(model), unet, lora)


def run_pairs(args: argparse.Namespace) -> int:
    from diffusion_po.toy.pairs import write_pairs

    _check_positive(n=args.n, sample_steps=args.sample_steps)
    if not 0.0 <= args.label_noise < 0.5:
        raise UserError(f"--label-noise must be in [0, 0.5), got {args.label_noise}")
    _set_threads(args.threads)
    summary = write_pairs(_pipe(args.model), args.out, args.n, args.seed, args.split, args.label_noise,
                          args.min_margin, args.sample_steps, args.guidance)
    print(json.dumps(summary.to_dict(), indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from diffusion_po.toy import oracle, world
    from diffusion_po.toy.pairs import sample

    _check_positive(n=args.n, sample_steps=args.sample_steps)
    if args.unet and args.lora:
        raise UserError("give --unet or --lora, not both")
    _set_threads(args.threads)
    pipe = _pipe(args.model, args.unet, args.lora)
    prompts = world.held_out_prompts(args.n, args.seed, split=args.split)
    seeds = [args.seed * 1_000_003 + i for i in range(args.n)]
    images = sample(pipe, prompts, seeds, args.sample_steps, args.guidance, progress=True)
    results = oracle.score_many(images, prompts)
    summary = oracle.summarize(results)
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as fh:
            for p, s, r in zip(prompts, seeds, results):
                fh.write(json.dumps({"prompt": p, "seed": s, **r.to_dict()}) + "\n")
    if args.grid:
        from diffusion_po.sampling.io import make_grid

        shown = images[:32]
        cols = min(8, len(shown))
        grid = make_grid(shown, cols)
        grid.resize((grid.width * 3, grid.height * 3), 0).save(args.grid)
    return 0


def run_prompts(args: argparse.Namespace) -> int:
    from diffusion_po.toy import world

    _check_positive(n=args.n)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(world.held_out_prompts(args.n, args.seed, split=args.split)) + "\n")
    print(out)
    return 0


def run_base(args: argparse.Namespace) -> int:
    from diffusion_po.toy.build import ensure_base

    print(ensure_base())
    return 0
