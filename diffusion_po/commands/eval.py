"""`diffusion-po eval`: generate benchmark images, score them, compare two models, write reports.

Sub-commands: generate, score, compare, benchmark, import, prompts, prefetch, hps-export,
geneval-export, geneval-summary, parity. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from diffusion_po.commands.sample import add_true_cfg_args
from diffusion_po.errors import UserError


# ---------------------------------------------------------------------------------------- arguments
def _add_scorer_args(p: argparse.ArgumentParser, metrics_required: bool = True) -> None:
    p.add_argument("--metrics", required=metrics_required, default=None,
                   help="comma-separated scorers: pickscore, hps_v2, hps_v2.1, clip, clip_openclip, aesthetic, imagereward, "
                        "toy (the toy world's oracle)")
    p.add_argument("--models-root", default=None,
                   help="folder with the scorer files in the flat layout (no network access when set; "
                        "default $DIFFUSION_PO_MODELS_ROOT)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME[.OPTION]=VALUE",
                   help="per-scorer path or hub id, e.g. pickscore=/m/PickScore_v1, hps_v2.1=/m/HPS_v2.1_compressed.pt, "
                        "aesthetic.backbone=/m/clip-vit-large-patch14, pickscore.processor=..., hps_v2.1.arch=ViT-H-14")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast precision of the scorers (weights stay fp32)")
    p.add_argument("--batch-size", type=int, default=32, help="images per scoring batch")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers decoding images")


def _add_generation_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument("--prompts", required=True,
                   help="parti, geneval, pickapic_v2_test_unique:PATH, hpsv2:DIR, drawbench:PATH or a prompt file")
    p.add_argument("--n", "-n", "--num-images-per-prompt", dest="n", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="base seed: image k of prompt i uses seed + i*n + k")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (pipeline default if unset)")
    p.add_argument("--guidance-scale", "--cfg", dest="guidance_scale", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--scheduler", default=None,
                   help="a `diffusion-po sample` scheduler name (ddim, euler, dpm++, flow_euler, ...) or a diffusers class name")
    _add_guidance_args(p)
    p.add_argument("--gen-dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="pipeline dtype (auto: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--format", dest="image_format", default="png", choices=["png", "jpg"])
    p.add_argument("--start", type=int, default=0, help="first prompt index")
    p.add_argument("--limit", type=int, default=None, help="number of prompts (default: all)")
    p.add_argument("--gen-batch-size", type=int, default=4, help="images per pipeline call")


def _check_generation_args(args: argparse.Namespace) -> None:
    from diffusion_po.sampling.api import check_sampling_settings

    check_sampling_settings(args.steps, args.guidance_rescale, args.limit)


def _add_guidance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance", default=None, choices=["cfg", "perp-neg", "npo", "composable"],
                   help="sample through diffusion_po.sampling with this guidance (default: the stock pipeline call)")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--npo-lora", default=None, help="NPO LoRA for the negative branch (implies the sampler)")
    add_true_cfg_args(p)  # as `diffusion-po sample` (either implies the sampler)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval", help="benchmark images: generate, score (PickScore, HPS, CLIP, aesthetic), compare, report",
        description="Evaluation: benchmark image generation, scoring, paired comparisons and reports.",
    )
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])
    esub = parser.add_subparsers(dest="eval_command", metavar="COMMAND")

    p = esub.add_parser("generate", help="images for one model over a prompt set (resumable)")
    p.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    p.add_argument("--lora", default=None, help="LoRA folder (pytorch_lora_weights.safetensors)")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--network", default=None, help="a fine-tuned unet/transformer folder replacing the pipeline's")
    p.add_argument("--out", "--output-dir", "-o", dest="out", required=True,
                   help="run folder (images/, manifest.jsonl, run.json)")
    p.add_argument("--device", default=None)
    _add_generation_args(p)
    p.add_argument("--batch-size", dest="gen_batch_size", type=int, default=argparse.SUPPRESS,
                   help="images per pipeline call (= --gen-batch-size, as `diffusion-po sample --batch-size`)")
    p.set_defaults(func=run_generate)

    p = esub.add_parser("score", help="per-image scores of an image run (resumable)")
    p.add_argument("--images", required=True, help="run folder with manifest.jsonl")
    p.add_argument("--out", default=None, help="where scores go (default: the run folder)")
    p.add_argument("--skip-bad-images", action="store_true", help="record unreadable images and go on")
    _add_scorer_args(p)
    p.set_defaults(func=run_score)

    p = esub.add_parser("compare", help="paired comparison of two scored runs (win rates, means, CIs)")
    p.add_argument("--a", required=True, help="scored run folder (or scores.parquet) of the model")
    p.add_argument("--b", required=True, help="scored run folder (or scores.parquet) of the baseline")
    p.add_argument("--metrics", default=None, help="metrics to compare (default: all primary metrics in both)")
    p.add_argument("--label-a", default=None)
    p.add_argument("--label-b", default=None)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie-tol", type=float, default=0.0, help="|a-b| <= tol counts as a tie")
    p.add_argument("--out", default=None, help="folder for compare.json + report.md + plots")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=run_compare)

    p = esub.add_parser("benchmark", help="generate + score + compare + markdown report in one go")
    p.add_argument("--model", default=None, help="the tuned model (pipeline folder or hub id)")
    p.add_argument("--lora", default=None)
    p.add_argument("--network", default=None)
    p.add_argument("--baseline", default=None, help="the baseline model (default: --model without LoRA/network)")
    p.add_argument("--baseline-lora", default=None)
    p.add_argument("--baseline-network", default=None)
    p.add_argument("--a-images", default=None, help="reuse an existing image run for the model")
    p.add_argument("--b-images", default=None, help="reuse an existing image run for the baseline")
    p.add_argument("--label-a", default=None)
    p.add_argument("--label-b", default=None)
    p.add_argument("--out", "--output-dir", "-o", dest="out", required=True)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--prompts", default=None, help="prompt set (needed unless both image runs are given)")
    p.add_argument("--n", "-n", "--num-images-per-prompt", dest="n", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", "--cfg", dest="guidance_scale", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--scheduler", default=None, help="as `diffusion-po sample --scheduler`")
    _add_guidance_args(p)
    p.add_argument("--gen-dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--format", dest="image_format", default="png", choices=["png", "jpg"])
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--gen-batch-size", type=int, default=4)
    _add_scorer_args(p)
    p.set_defaults(func=run_benchmark)

    p = esub.add_parser("import", help="write a manifest.jsonl for an image folder made elsewhere")
    p.add_argument("--images", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--layout", default="flat", choices=["flat", "hps", "geneval"])
    p.set_defaults(func=run_import)

    p = esub.add_parser("prompts", help="list prompt sets, or show a set's size and categories")
    p.add_argument("spec", nargs="?", default=None)
    p.add_argument("--show", type=int, default=5, help="prompts to print")
    p.set_defaults(func=run_prompts)

    p = esub.add_parser("prefetch", help="download exactly the scorer files into --models-root (needs network)")
    p.add_argument("--models-root", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--with-laion-processor", action="store_true",
                   help="also the laion CLIP-H processor files (PickScore README parity)")
    p.add_argument("--dry-run", action="store_true", help="only list the files")
    p.set_defaults(func=run_prefetch)

    p = esub.add_parser("geneval-export", help="export a geneval run in GenEval's folder layout")
    p.add_argument("--images", required=True, help="run generated with --prompts geneval (GenEval uses --n 4)")
    p.add_argument("--out", required=True)
    p.add_argument("--link", action="store_true", help="hard-link instead of copying")
    p.set_defaults(func=run_geneval_export)

    p = esub.add_parser("hps-export", help="export a run on hpsv2:DIR prompts as <style>/<index>.jpg (hpsv2 layout)")
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=run_hps_export)

    p = esub.add_parser("geneval-summary", help="summarise GenEval's results.jsonl")
    p.add_argument("results")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_geneval_summary)

    p = esub.add_parser("parity", help="check our scores against the official scorers' values")
    p.add_argument("--image", action="append", required=True, help="image file (repeatable)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt per image, or one for all (default: the HPS demo prompt)")
    p.add_argument("--official", default=None, help="JSON {metric: value or [values]} from the official code")
    p.add_argument("--tolerance", type=float, default=None)
    p.add_argument("--out", default=None, help="write the parity result JSON here")
    _add_scorer_args(p)
    p.set_defaults(func=run_parity)


# ----------------------------------------------------------------------------------------- handlers
def _build_scorers(args: argparse.Namespace) -> list[Any]:
    from diffusion_po.eval.scorers import build_scorer, parse_checkpoint_options, parse_metric_list

    names = parse_metric_list(args.metrics)
    if not names:
        raise UserError("--metrics: give at least one scorer")
    options = parse_checkpoint_options(args.checkpoint)
    extra = sorted(set(options) - set(names))
    if extra:
        raise UserError(f"--checkpoint given for {', '.join(extra)} which is not in --metrics")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    return [
        build_scorer(n, models_root=args.models_root, device=args.device, dtype=args.dtype, **options.get(n, {}))
        for n in names
    ]


def _generation_config(args: argparse.Namespace, model: str, lora: str | None, network: str | None) -> Any:
    from diffusion_po.eval.generate import GenerateConfig

    _check_generation_args(args)
    return GenerateConfig(
        model=model, prompts=args.prompts, lora=lora, lora_scale=getattr(args, "lora_scale", 1.0),
        network=network, n=args.n, seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
        height=args.height, width=args.width, negative_prompt=args.negative_prompt, scheduler=args.scheduler,
        dtype=args.gen_dtype, image_format=args.image_format, start=args.start, limit=args.limit,
        guidance=args.guidance, guidance_rescale=args.guidance_rescale, npo_lora=args.npo_lora,
        true_cfg=args.true_cfg, embedded_guidance=args.embedded_guidance,
    )


def run_generate(args: argparse.Namespace) -> int:
    from diffusion_po.eval.generate import generate_images

    cfg = _generation_config(args, args.model, args.lora, args.network)
    out = generate_images(cfg, args.out, device=args.device, batch_size=args.gen_batch_size)
    print(f"images and manifest in {out}")
    return 0


def run_score(args: argparse.Namespace) -> int:
    from diffusion_po.eval.scoring import score_run

    scorers = _build_scorers(args)
    meta = score_run(args.images, scorers, args.out, batch_size=args.batch_size, num_workers=args.num_workers,
                     skip_bad_images=args.skip_bad_images)
    t = meta["throughput"]
    print(f"scored {t['images_scored']} images ({meta['n_images']} in the run) in {t['wall_seconds']} s"
          f" -> {t['images_per_second']} images/s; per scorer (model time): {t['per_scorer_images_per_second']}")
    print(f"scores in {Path(args.out or args.images) / 'scores.parquet'}")
    if meta["unreadable_images"]:
        print(f"{len(meta['unreadable_images'])} unreadable images skipped", file=sys.stderr)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from diffusion_po.eval.compare import compare_runs, format_summary

    metrics = [m for m in (args.metrics or "").split(",") if m.strip()]
    result = compare_runs(args.a, args.b, metrics, label_a=args.label_a, label_b=args.label_b,
                          n_boot=args.n_boot, seed=args.seed, tie_tol=args.tie_tol)
    if args.out:
        from diffusion_po.eval.report import write_report
        from diffusion_po.eval.scoring import load_score_table

        report = write_report(result, args.out, load_score_table(args.a)[0], load_score_table(args.b)[0])
        print(f"report: {report}")
    print(json.dumps(result, indent=1, default=str) if args.json else format_summary(result))
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    from diffusion_po.eval.benchmark import run_benchmark as bench

    if args.a_images is None and args.model is None:
        raise UserError("give --model (to generate) or --a-images (an existing run)")
    if args.b_images is None and args.baseline is None and args.model is None:
        raise UserError("give --baseline (to generate) or --b-images (an existing run)")
    need_gen = args.a_images is None or args.b_images is None
    if need_gen and not args.prompts:
        raise UserError("--prompts is required to generate images")
    model_cfg = baseline_cfg = None
    if need_gen:
        if args.a_images is None:
            model_cfg = _generation_config(args, args.model, args.lora, args.network)
        if args.b_images is None:
            baseline = args.baseline or args.model
            if baseline == args.model and not (args.baseline_lora or args.baseline_network) and not (
                args.lora or args.network
            ):
                raise UserError("--baseline is the same as --model without any LoRA/network: nothing to compare")
            baseline_cfg = _generation_config(args, baseline, args.baseline_lora, args.baseline_network)
    scorers = _build_scorers(args)
    label_a = args.label_a or (Path(args.lora).name if args.lora else Path(args.model or args.a_images).name)
    label_b = args.label_b or Path(args.baseline or args.model or args.b_images).name
    if label_a == label_b:
        label_a, label_b = f"{label_a} (A)", f"{label_b} (B)"
    result = bench(
        args.out, scorers, model_cfg=model_cfg, baseline_cfg=baseline_cfg, a_images=args.a_images,
        b_images=args.b_images, label_a=label_a, label_b=label_b, device=args.device,
        gen_batch_size=args.gen_batch_size, score_batch_size=args.batch_size, num_workers=args.num_workers,
        n_boot=args.n_boot,
    )
    print(result["summary"])
    print(f"report: {result['report']}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from diffusion_po.eval.importer import import_folder
    from diffusion_po.eval.prompts import load_prompt_set

    path, n, missing = import_folder(args.images, load_prompt_set(args.prompts), args.layout)
    print(f"wrote {path}: {n} images" + (f"; {missing} prompts have no image" if missing else ""))
    return 0


def run_prompts(args: argparse.Namespace) -> int:
    from diffusion_po.eval.prompts import BUILTIN, FILE_SETS, load_prompt_set

    if not args.spec:
        print("shipped prompt sets:")
        for k, v in BUILTIN.items():
            print(f"  {k:<12} {v}")
        print("from local files (NAME:PATH):")
        for k, v in FILE_SETS.items():
            print(f"  {k:<12} {v}")
        print("or a prompt file: .txt (one per line), .jsonl/.json (prompt, category, id), .tsv/.csv, .parquet")
        return 0
    ps = load_prompt_set(args.spec)
    print(f"{ps.name}: {len(ps)} prompts from {ps.source}")
    if ps.categories:
        from collections import Counter

        counts = Counter(it.category for it in ps)
        print("categories: " + ", ".join(f"{c} ({counts[c]})" for c in ps.categories))
    for it in ps.items[: max(0, args.show)]:
        print(f"  [{it.id}] {it.text}" + (f"  ({it.category})" if it.category else ""))
    return 0


def run_prefetch(args: argparse.Namespace) -> int:
    from diffusion_po.eval.models import prefetch
    from diffusion_po.eval.scorers import parse_metric_list

    extra = ["laion_clip_h_processor"] if args.with_laion_processor else []
    plan = prefetch(args.models_root, parse_metric_list(args.metrics), extra, dry_run=args.dry_run)
    for source, target in plan:
        print(f"{'would fetch' if args.dry_run else 'fetched'} {source} -> {target}")
    return 0


def run_geneval_export(args: argparse.Namespace) -> int:
    from diffusion_po.eval.geneval import export_geneval

    n = export_geneval(args.images, args.out, link=args.link)
    print(f"exported {n} images to {args.out} (GenEval layout)")
    return 0


def run_hps_export(args: argparse.Namespace) -> int:
    from diffusion_po.eval.importer import export_hps

    n = export_hps(args.images, args.out)
    print(f"exported {n} images to {args.out} (hpsv2.evaluate layout)")
    return 0


def run_geneval_summary(args: argparse.Namespace) -> int:
    from diffusion_po.eval.geneval import format_geneval, summarize_geneval

    summary = summarize_geneval(args.results)
    print(json.dumps(summary, indent=1) if args.json else format_geneval(summary))
    return 0


def run_parity(args: argparse.Namespace) -> int:
    from diffusion_po.eval.parity import DEMO_PROMPT, load_official
    from diffusion_po.eval.parity import run_parity as parity

    scorers = _build_scorers(args)
    official = load_official(args.official) if args.official else None
    result = parity(args.image, args.prompt or [DEMO_PROMPT], scorers, official, args.tolerance)
    for metric, values in result["scores"].items():
        print(f"{metric:<36} " + "  ".join(f"{v:.6f}" for v in values))
    for c in result["checks"]:
        print(f"{'OK ' if c['ok'] else 'BAD'} {c['metric']:<14} ours {c['ours']:.6f} official {c['official']:.6f} "
              f"|diff| {c['abs_diff']:.6f} (tol {c['tolerance']})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1
