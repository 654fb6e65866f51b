"""`diffusion-po toy`: the embedded toy world (build the base model, make pairs, run the main job and the
experiments of docs/methods.md and docs/sampling.md, evaluate).

    diffusion-po toy run   [--out runs/toy_dpo] [--pairs 1000] [--config FILE_OR_NAME] [--set key=value]
    diffusion-po toy build [--out DIR] [--seed 0] [--steps 3000] [--vae-steps 1200] [--images 40000]
    diffusion-po toy pairs --out pairs.parquet [--n 1000] [--seed 0] [--label-noise 0.1] [--model DIR]
    diffusion-po toy eval  [--model DIR] [--unet DIR | --lora DIR] [--n 263] [--out scores.jsonl]
    diffusion-po toy method NAME [--out runs/toy_NAME] [--pairs 1000] [--pairs-file F] [--cache-dir D]
    diffusion-po toy table RUN [RUN ...]
    diffusion-po toy compare [--out runs/toy_compare] [--methods dpo,npo,...] [--seeds 0,1,2] [--pairs 1000]
                             [--steps 100] [--jobs 2]     # the leaderboard: every method, same budget, seeds
    diffusion-po toy online curated|online_dpo [--out runs/toy_online_METHOD] [--rounds 5] [--prompts 512]
                           [--real-fraction 0.5] [--bias red:0.3] [--set key=value] [--compare RUN]
    diffusion-po toy online-plot RUN [RUN ...] --out curves.png
    diffusion-po toy scales [--scales 1,2,4,8] [--val 152]
    diffusion-po toy shift CHECKPOINT
    diffusion-po toy perp-neg [--out runs/toy_perp_neg] [--n 240]
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
    _world_argument(p)
    p.add_argument("--model", default=None, help="base pipeline folder (default: the world's shipped toy base)")
    p.add_argument("--config", default=None, help="YAML of trainer keys (a file, or a shipped name such as "
                   "toy_kto) over the shipped configs/toy_dpo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a trainer key, e.g. --set learning_rate=1e-6 (repeatable)")
    p.add_argument("--pairs", type=int, default=1000, help="number of preference pairs (train prompts)")
    p.add_argument("--samples-per-prompt", type=int, default=None,
                   help="images sampled per pair prompt: 2, or K > 2 for the best and the worst of K (default: "
                   "the world's main-job setting)")
    p.add_argument("--pairs-file", default=None, help="train on this pairs parquet instead of sampling new pairs")
    p.add_argument("--pair-seed", type=int, default=0)
    p.add_argument("--label-noise", type=float, default=0.0, help="probability of flipping a pair's label")
    p.add_argument("--min-margin", type=float, default=0.0, help="pairs with a smaller reward gap become ties")
    p.add_argument("--val", type=int, default=152, help="validation items for early stopping")
    p.add_argument("--test", type=int, default=263,
                   help="held-out test captions (the split has 848 compositional, 263 simple)")
    _test_seeds_argument(p)
    p.add_argument("--sample-steps", type=int, default=10, help="sampler steps (DPM-Solver++)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--tie-tol", type=float, default=1e-3, help="reward differences up to this count as ties")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.set_defaults(func=run_main)

    p = verbs.add_parser("build", help="pretrain the toy base model (a StableDiffusionPipeline folder)")
    p.add_argument("--out", default=None, help="output folder (default: a cache folder; prints its path)")
    _world_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help="UNet + text encoder steps (default: the world's shipped recipe: 3000)")
    p.add_argument("--vae-steps", type=int, default=None, help="autoencoder steps (default 1200)")
    p.add_argument("--images", type=int, default=None, help="rendered training images (default 40000)")
    p.add_argument("--batch", type=int, default=None, help="UNet batch size (default 32)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--small", action="store_true", help="a reduced build for smoke tests (seconds)")
    p.set_defaults(func=run_build)

    p = verbs.add_parser("pairs", help="sample two images per prompt, label by the oracle, write Pick-a-Pic parquet")
    p.add_argument("--out", required=True, help="parquet file to write")
    _world_argument(p)
    p.add_argument("--model", default=None, help="pipeline folder to sample from (default: the shipped toy base)")
    p.add_argument("--n", type=int, default=1000, help="number of pairs")
    p.add_argument("--samples-per-prompt", type=int, default=2,
                   help="images sampled per prompt: 2, or K > 2 for the best and the worst of K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--label-noise", type=float, default=0.0)
    p.add_argument("--min-margin", type=float, default=0.0)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=run_pairs)

    p = verbs.add_parser("eval", help="oracle reward and caption-following accuracy of a toy model")
    _world_argument(p)
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
    _register_experiments(verbs)

    p = verbs.add_parser("prompts", help="held-out toy captions as a prompt file for `eval generate`")
    p.add_argument("--out", required=True, help="prompt file to write (.txt, one caption a line)")
    _world_argument(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--n", type=int, default=263, help="number of captions (the test split has 848 compositional, 263 simple captions)")
    p.add_argument("--seed", type=int, default=1234)
    p.set_defaults(func=run_prompts)

    p = verbs.add_parser("base", help="print the toy base model folder (shipped, or cached build)")
    _world_argument(p)
    p.set_defaults(func=run_base)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def _register_experiments(verbs: argparse._SubParsersAction) -> None:
    """The experiments of docs/methods.md and docs/sampling.md (diffusion_po.toy.methods, .perp_neg)."""
    from diffusion_po.toy.methods import METHODS

    p = verbs.add_parser("method", help="one method with the main job's protocol: data -> training -> validation "
                         "-> paired test against the base", description="Train and evaluate one method in the toy "
                         "world (docs/methods.md); writes results.json and report.md into --out.")
    p.add_argument("name", choices=METHODS, metavar="NAME", help=f"the method: {', '.join(METHODS)}")
    p.add_argument("--out", default=None, help="run folder (default: runs/toy_NAME)")
    _world_argument(p)
    p.add_argument("--model", default=None, help="toy base folder (default: shipped or cached)")
    p.add_argument("--config", default=None, help="YAML over configs/toy_dpo.yaml (default: the shipped "
                   "configs/toy_NAME.yaml where there is one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a trainer key (repeatable)")
    p.add_argument("--pairs", type=int, default=1000, help="number of preference pairs (train prompts)")
    p.add_argument("--val", type=int, default=152, help="validation items for early stopping")
    p.add_argument("--test", type=int, default=263, help="held-out test captions")
    _test_seeds_argument(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--pairs-file", default=None, help="reuse this pairs parquet instead of sampling new pairs")
    p.add_argument("--experts", type=int, default=None,
                   help="(dro) how many top images of the pair samples are the experts (default pairs / 4)")
    p.add_argument("--images", default=None,
                   help="(self_npo) train from these images (an experts.jsonl) instead of prompts only")
    p.add_argument("--cache-dir", default=None, help="cache the base model's validation/test rewards here")
    p.set_defaults(func=run_method)

    p = verbs.add_parser("compare", help="the method leaderboard: every method at the same compute budget over "
                         "seeds", description="Every method with the toy protocol at the same budget (optimizer "
                         "steps, generated images) over several seeds; writes leaderboard.md/.json/.png into --out "
                         "(docs/methods.md#leaderboard). Finished runs are kept: a rerun resumes.")
    p.add_argument("--out", default="runs/toy_compare", help="output folder (default: runs/toy_compare)")
    _world_argument(p)
    p.add_argument("--model", default=None, help="toy base folder (default: the world's shipped toy base)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: dpo, npo, self_npo, dcpo, "
                   "dro, kto, mapo, sft, robust_dpo, curated, online_dpo)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: pair sampling and trainer (default 0,1,2)")
    p.add_argument("--pairs", type=int, default=500,
                   help="pairs per seed: P x pairs generated images per method (P = 4 compositional, 2 simple)")
    p.add_argument("--val", type=int, default=100, help="validation items (checkpoint choice; default 100)")
    p.add_argument("--test", type=int, default=263, help="held-out test captions per seed")
    _test_seeds_argument(p)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of every method (default 100)")
    p.add_argument("--checkpoints", type=int, default=4,
                   help="validation candidates per run (the online methods' rounds; default 4)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per run (default: torch's; with --jobs: the CPUs shared out)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer key for every run (repeatable; the budget's steps, checkpoints and online "
                   "batch sizes win)")
    p.set_defaults(func=run_compare)

    from diffusion_po.toy.online import ONLINE_METHODS

    p = verbs.add_parser("online", help="online preference learning round by round (curated retraining, online "
                         "DPO): reward, oracle parts, bias prevalence and diversity per round",
                         description="Train an online method through the shared trainer on the toy world, one "
                         "checkpoint per round, and evaluate every round with the unbiased oracle (docs/toy.md, "
                         "\"Online preference learning\"); writes results.json, report.md and curves.png into --out.")
    p.add_argument("name", choices=ONLINE_METHODS, metavar="METHOD", help=f"the method: {', '.join(ONLINE_METHODS)}")
    p.add_argument("--out", default=None, help="run folder (default: runs/toy_online_METHOD)")
    _world_argument(p)
    p.add_argument("--model", default=None, help="toy base folder (default: the world's shipped or cached base)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (each of the config's steps_per_round steps)")
    p.add_argument("--prompts", type=int, default=512, help="train captions the rounds sample for")
    p.add_argument("--real-fraction", type=float, default=0.0, metavar="LAMBDA",
                   help="(curated) share of training rows that are real images: expert drawings of the captions")
    p.add_argument("--bias", default=None, metavar="COLOUR:WEIGHT",
                   help="give the reward a known bias: + WEIGHT x the foreground share of COLOUR (e.g. red:0.3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a trainer key, e.g. --set method_options.reference=refresh (repeatable)")
    p.add_argument("--val", type=int, default=152, help="validation items per round")
    p.add_argument("--diversity-prompts", type=int, default=8, help="validation captions of the diversity measure")
    p.add_argument("--diversity-samples", type=int, default=16, help="samples per diversity caption")
    p.add_argument("--sample-steps", type=int, default=10, help="evaluation sampler steps (DPM-Solver++)")
    p.add_argument("--guidance", type=float, default=4.0, help="evaluation classifier-free guidance scale")
    p.add_argument("--compare", action="append", default=[], metavar="RUN",
                   help="an earlier online run folder to draw on the same curves.png (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.set_defaults(func=run_online)

    p = verbs.add_parser("online-plot", help="the per-round curves of finished `toy online` runs on one plot")
    p.add_argument("folders", nargs="+", metavar="RUN", help="run folders (with results.json)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=run_online_plot)

    p = verbs.add_parser("table", help="a markdown table of finished toy runs")
    p.add_argument("folders", nargs="+", metavar="RUN", help="run folders (with results.json)")
    p.set_defaults(func=run_table)

    p = verbs.add_parser("scales", help="plain CFG's validation reward per guidance scale")
    p.add_argument("--scales", default="1,1.5,2,3,4,5,6,8", help="comma-separated CFG scales")
    p.add_argument("--model", default=None, help="toy base folder (default: shipped or cached)")
    p.add_argument("--val", type=int, default=152, help="validation items")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=run_scales)

    p = verbs.add_parser("shift", help="how a negative model moves the unconditional prediction, per timestep")
    p.add_argument("negative", metavar="CHECKPOINT",
                   help="the negative model: a checkpoint, a training output or a unet folder")
    p.add_argument("--model", default=None, help="toy base folder (default: shipped or cached)")
    p.set_defaults(func=run_shift)

    p = verbs.add_parser("perp-neg", help="Perp-Neg vs a plain negative prompt when the concepts overlap")
    p.add_argument("--out", default="runs/toy_perp_neg", help="output folder (default: runs/toy_perp_neg)")
    p.add_argument("--model", default=None, help="toy base folder (default: shipped or cached)")
    p.add_argument("--n", type=int, default=240, help="caption/seed items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-steps", type=int, default=10, help="sampler steps (DPM-Solver++)")
    p.add_argument("--guidance", type=float, default=4.0, help="guidance scale")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=run_perp_neg)


def _world_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", default="compositional", choices=["compositional", "simple"],
                   help="the toy world: compositional (counts, binding, relations, sizes, negations; the "
                   "default) or simple (one or two shapes)")


def _test_seeds_argument(p: argparse.ArgumentParser) -> None:
    from diffusion_po.toy import TEST_SEEDS as default  # not toy.experiment: --help imports no torch

    p.add_argument("--test-seeds", type=int, default=default,
                   help=f"images per test caption, each its own seed; the win rate compares each caption's mean "
                   f"over them (default {default})")


def _check_samples_per_prompt(k: int) -> None:
    if k < 2:
        raise UserError(f"--samples-per-prompt must be at least 2 (a pair), got {k}")


def _check_positive(**values: int | None) -> None:
    for name, v in values.items():
        if v is not None and v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")


def run_main(args: argparse.Namespace) -> int:
    from diffusion_po.toy.experiment import ToyRunConfig, run_toy_dpo

    _check_positive(pairs=args.pairs, val=args.val, test=args.test, test_seeds=args.test_seeds,
                    sample_steps=args.sample_steps)
    if not 0.0 <= args.label_noise < 0.5:
        raise UserError(f"--label-noise must be in [0, 0.5), got {args.label_noise}")
    run = ToyRunConfig(out=args.out, world=args.world, model=args.model, config=args.config, overrides=args.overrides,
                       n_pairs=args.pairs, pair_seed=args.pair_seed, label_noise=args.label_noise,
                       min_margin=args.min_margin, n_val=args.val, n_test=args.test, test_seeds=args.test_seeds,
                       steps=args.sample_steps,
                       scale=args.guidance, threads=args.threads, keep_checkpoints=args.keep_checkpoints,
                       pairs_file=args.pairs_file, tie_tol=args.tie_tol)
    if args.samples_per_prompt is not None:
        _check_samples_per_prompt(args.samples_per_prompt)
        run.pair_samples = args.samples_per_prompt
    if args.pairs_file and not Path(args.pairs_file).is_file():
        raise UserError(f"--pairs-file {args.pairs_file} does not exist")
    results = run_toy_dpo(run)
    wr = results["win_rate"]
    print(f"win rate of tuned over base: {wr['win_rate']:.3f} [{wr['lo']:.3f}, {wr['hi']:.3f}] over {wr['n']} "
          f"held-out captions ({args.test_seeds} seed(s) each); mean reward base {results['base']['reward']['value']:.4f} -> tuned "
          f"{results['tuned']['reward']['value']:.4f}; total {results['timings_s']['total']:.0f}s")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from diffusion_po.toy.build import BuildConfig, build_base, cache_dir, cache_key, is_pipeline_folder
    from diffusion_po.toy.worlds import get_world

    _check_positive(steps=args.steps, vae_steps=args.vae_steps, images=args.images, batch=args.batch,
                    threads=args.threads)
    cfg = get_world(args.world).build_config(args.seed)
    if args.small:
        import dataclasses

        small = BuildConfig.small(args.seed)
        cfg = dataclasses.replace(small, world=cfg.world, caption_split=cfg.caption_split, lr_schedule=cfg.lr_schedule)
    for key, value in (("steps", args.steps), ("vae_steps", args.vae_steps), ("n_images", args.images),
                       ("batch", args.batch), ("threads", args.threads)):
        if value is not None:
            setattr(cfg, key, value)
    if args.out is None:
        out = cache_dir() / cache_key(cfg)
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


def _pipe(model: str | None, world_name: str, unet: str | None = None, lora: str | None = None):
    from diffusion_po.toy.build import ensure_base
    from diffusion_po.toy.pairs import load_pipeline

    return load_pipeline(ensure_base(model, world_name=world_name), unet, lora)


def run_pairs(args: argparse.Namespace) -> int:
    from diffusion_po.toy.pairs import write_pairs

    _check_positive(n=args.n, sample_steps=args.sample_steps)
    if not 0.0 <= args.label_noise < 0.5:
        raise UserError(f"--label-noise must be in [0, 0.5), got {args.label_noise}")
    _check_samples_per_prompt(args.samples_per_prompt)
    _set_threads(args.threads)
    summary = write_pairs(_pipe(args.model, args.world), args.out, args.n, args.seed, args.split, args.label_noise,
                          args.min_margin, args.sample_steps, args.guidance, world=args.world,
                          samples_per_prompt=args.samples_per_prompt)
    print(json.dumps(summary.to_dict(), indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from diffusion_po.toy.experiment import eval_seeds
    from diffusion_po.toy.pairs import sample
    from diffusion_po.toy.worlds import get_world

    _check_positive(n=args.n, sample_steps=args.sample_steps)
    if args.unet and args.lora:
        raise UserError("give --unet or --lora, not both")
    _set_threads(args.threads)
    pipe = _pipe(args.model, args.world, args.unet, args.lora)
    toy_world = get_world(args.world)
    prompts = toy_world.prompts(args.n, args.seed, split=args.split)
    seeds = eval_seeds(args.n, args.seed)
    images = sample(pipe, prompts, seeds, args.sample_steps, args.guidance, progress=True)
    results = toy_world.score_many(images, prompts)
    summary = toy_world.summarize(results)
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


def run_method(args: argparse.Namespace) -> int:
    from diffusion_po.toy.experiment import ToyRunConfig
    from diffusion_po.toy.methods import run_method as run

    _check_positive(pairs=args.pairs, val=args.val, test=args.test, test_seeds=args.test_seeds, experts=args.experts)
    for flag, path in (("--pairs-file", args.pairs_file), ("--images", args.images)):
        if path and not Path(path).is_file():
            raise UserError(f"{flag} {path} does not exist")
    _set_threads(args.threads)
    out = args.out or f"runs/toy_{args.name}"
    cfg = ToyRunConfig(out=out, world=args.world, model=args.model, config=args.config, overrides=list(args.overrides),
                       n_pairs=args.pairs, n_val=args.val, n_test=args.test, test_seeds=args.test_seeds,
                       threads=args.threads, keep_checkpoints=args.keep_checkpoints)
    res = run(args.name, cfg, args.pairs_file, args.cache_dir, args.experts, args.images)
    wr = res["win_rate"]
    print(f"{args.name}: win rate {wr['win_rate']:.3f} [{wr['lo']:.3f}, {wr['hi']:.3f}] (n={wr['n']}); "
          f"report in {out}/report.md")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from diffusion_po.toy.compare import COMPARE_METHODS, CompareConfig, parse_methods, parse_seeds
    from diffusion_po.toy.compare import run_compare as run

    cfg = CompareConfig(out=args.out, world=args.world, model=args.model,
                        methods=parse_methods(args.methods) if args.methods is not None else COMPARE_METHODS,
                        seeds=parse_seeds(args.seeds), n_pairs=args.pairs, n_val=args.val, n_test=args.test,
                        test_seeds=args.test_seeds,
                        train_steps=args.steps, checkpoints=args.checkpoints, threads=args.threads, jobs=args.jobs,
                        overrides=list(args.overrides))
    rows = run(cfg)
    out = Path(args.out)
    print((out / "leaderboard.md").read_text())
    print(f"{len(rows)} methods; leaderboard in {out / 'leaderboard.md'}, {out / 'leaderboard.json'}, "
          f"{out / 'leaderboard.png'}")
    return 0


def run_online(args: argparse.Namespace) -> int:
    from diffusion_po.toy.online import OnlineRunConfig, check_run, load_results
    from diffusion_po.toy.online import run_online as run

    _set_threads(args.threads)
    cfg = OnlineRunConfig(method=args.name, out=args.out, world=args.world, model=args.model, rounds=args.rounds,
                          n_prompts=args.prompts, real_fraction=args.real_fraction, bias=args.bias,
                          overrides=list(args.overrides), n_val=args.val, diversity_prompts=args.diversity_prompts,
                          diversity_samples=args.diversity_samples, steps=args.sample_steps, scale=args.guidance,
                          threads=args.threads, keep_checkpoints=args.keep_checkpoints)
    check_run(cfg)
    for folder in args.compare:
        load_results(folder)
    res = run(cfg, args.compare)
    first, last = res["rounds"][0], res["rounds"][-1]
    print(f"{res['label']}: validation reward {first['reward']:.4f} (base) -> {last['reward']:.4f} (round "
          f"{last['round']}); diversity {first.get('entropy', 0):.2f} -> {last.get('entropy', 0):.2f} bits; "
          f"report in {cfg.folder / 'report.md'}")
    return 0


def run_online_plot(args: argparse.Namespace) -> int:
    from diffusion_po.toy.online import load_results, plot_rounds

    runs = [load_results(f) for f in args.folders]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_rounds(runs, Path(args.out))
    print(args.out)
    return 0


def run_table(args: argparse.Namespace) -> int:
    from diffusion_po.toy.methods import table

    print(table(args.folders))
    return 0


def run_scales(args: argparse.Namespace) -> int:
    from diffusion_po.toy.methods import scale_sweep

    try:
        scales = [float(x) for x in args.scales.split(",")]
    except ValueError:
        raise UserError(f"--scales must be comma-separated numbers, got '{args.scales}'") from None
    _check_positive(val=args.val)
    _set_threads(args.threads)
    print("| CFG scale | reward | colour | shape | clean |\n|---|---|---|---|---|")
    for r in scale_sweep(scales, args.model, args.val):
        print(f"| {r['scale']:g} | {r['reward']:.4f} | {r['colour']:.4f} | {r['shape']:.4f} | {r['clean']:.4f} |")
    return 0


def run_shift(args: argparse.Namespace) -> int:
    from diffusion_po.toy.methods import guidance_shift

    if not Path(args.negative).exists():
        raise UserError(f"{args.negative} does not exist; give the negative model's folder (a checkpoint, a "
                        "training output or a unet folder)")
    print("| t | k (along CFG's direction) | cos | norm d | norm D |\n|---|---|---|---|---|")
    for r in guidance_shift(args.negative, args.model):
        print(f"| {r['t']} | {r['k']:.3f} | {r['cos']:.3f} | {r['norm_d']:.2f} | {r['norm_D']:.2f} |")
    return 0


def run_perp_neg(args: argparse.Namespace) -> int:
    from diffusion_po.toy.perp_neg import run_perp_neg as run

    _check_positive(n=args.n, sample_steps=args.sample_steps)
    _set_threads(args.threads)
    res = run(args.out, args.model, args.n, args.seed, args.sample_steps, args.guidance)
    print(json.dumps(res, indent=2))
def run_prompts(args: argparse.Namespace) -> int:
    from diffusion_po.toy.worlds import get_world

    _check_positive(n=args.n)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(get_world(args.world).prompts(args.n, args.seed, split=args.split)) + "\n")
    print(out)
    return 0


def run_base(args: argparse.Namespace) -> int:
    from diffusion_po.toy.build import ensure_base

    print(ensure_base(world_name=args.world))
    return 0
