r"""`diffusion-po sample`: generate images with CFG, negative prompts, Perp-Neg or NPO guidance.

    diffusion-po sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a red circle and a blue square" \
        --negative-prompt "red:1.5" --guidance perp-neg --guidance-scale 7.5 --seeds 0-7 --output-dir out/
    diffusion-po sample --model sd15 --npo-lora out/npo --prompts prompts.jsonl --grid

Writes one PNG per (prompt, seed) with the prompt, seed and settings in its PNG text chunks, a
`manifest.jsonl` (one row per image), and optionally `grid.png` (rows = prompts, columns = seeds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from diffusion_po.errors import UserError


def _seeds(text: str) -> list[int]:
    """"0,1,5" or "0-199" or "0-3,10" -> list of ints."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                if int(hi) < int(lo):
                    raise argparse.ArgumentTypeError(f"seed range '{part}' is empty (its end is before its start)")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"cannot read seeds '{text}': use e.g. 0,1,5 or 0-199") from exc
    if not out:
        raise argparse.ArgumentTypeError("no seeds given")
    return out


def add_true_cfg_args(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--true-cfg` and `--embedded-guidance` (FLUX.1-dev), one definition for `sample` and `eval generate/benchmark`."""
    group.add_argument("--true-cfg", action="store_true",
                       help="FLUX.1-dev (guidance-distilled): run CFG / negative prompts / Perp-Neg / NPO as true-CFG "
                            "branches (diffusers' true_cfg_scale); without it only --guidance-scale 1 is accepted")
    group.add_argument("--embedded-guidance", type=float, default=None,
                       help="FLUX.1-dev's embedded guidance (FluxPipeline's guidance_scale; default 3.5)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="generate images with CFG, negative prompts, Perp-Neg or NPO guidance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", "--pretrained_model_name_or_path", dest="model", required=True,
                   help="diffusers pipeline folder or hub id (SD1.x/2.x, SDXL, SD3)")
    m.add_argument("--network", help="a trained unet/transformer replacing the model's: a full fine-tune's output_dir "
                   "(with unet/ or transformer/) or a model folder; --model is then the base pipeline")
    m.add_argument("--lora", help="positive LoRA folder (fused into the weights), e.g. a DPO output_dir")
    m.add_argument("--lora-scale", type=float, default=1.0)
    m.add_argument("--npo-lora", help="NPO LoRA folder: the negative branches run with it (one forward, mixed-adapter batch)")
    m.add_argument("--negative-model", help="a separate negative network: pipeline folder (unet/ or transformer/) or model folder")
    m.add_argument("--npo-base", help="base model the NPO weights were trained on (needed for --npo-merge-weight)")
    m.add_argument("--npo-merge-weight", type=float, default=0.0,
                   help="alpha of theta^- = theta^+ + Delta_NPO - alpha (theta^+ - theta_base) (default 0)")
    m.add_argument("--npo-branches", choices=["all", "uncond"], default="all",
                   help="which branches the negative model computes: unconditional and negative prompts (all), or only the unconditional")
    m.add_argument("--vae", help="alternative VAE folder or hub id (e.g. SDXL fp16-fix)")
    m.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    m.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile the network's repeated blocks (regional; the first batch compiles) and use "
                        "channels-last on CUDA UNets: faster for many images")

    q = p.add_argument_group("prompts")
    q.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    q.add_argument("--prompts", help="prompt file: .txt (one per line) or .jsonl ({'prompt', 'negative_prompt', 'seeds'})")
    q.add_argument("--prompt-set", help="a prompt set shipped with diffusion_po.eval.prompts")
    q.add_argument("--limit", type=int, help="use only the first N prompts")
    q.add_argument("--negative-prompt", action="append", default=[],
                   help="negative prompt, optionally with a weight: 'red:1.5' (repeatable; applies to every prompt)")
    q.add_argument("--positive-prompt", action="append", default=[],
                   help="extra positive prompt with weight 'side view:0.5' (perp-neg / composable; repeatable)")

    g = p.add_argument_group("guidance and sampling")
    g.add_argument("--guidance", default="cfg", choices=["cfg", "composable", "perp-neg", "npo"],
                   help="cfg (negative prompt replaces the empty prompt), composable, perp-neg, npo (cfg that requires NPO weights)")
    g.add_argument("--guidance-scale", "--cfg", dest="guidance_scale", type=float, default=None,
                   help="s (default: 7.5 SD, 5 SDXL, 7 SD3)")
    add_true_cfg_args(g)
    g.add_argument("--guidance-rescale", type=float, default=0.0, help="phi of Lin et al. guidance rescale (0 = off)")
    g.add_argument("--scheduler", help="ddim, ddpm, pndm, lms, euler, euler_a, heun, dpm++, dpm++_karras, dpm++_sde, unipc, "
                   "flow_euler, flow_heun, or a diffusers class name (default: the model's)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 28 for SD3)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    g.add_argument("--seed", type=int, default=0,
                   help="base seed: image k of prompt i uses seed + i*n + k (as `eval generate`)")
    g.add_argument("--num-images-per-prompt", "-n", "--n", dest="num_images_per_prompt", type=int, default=1)
    g.add_argument("--seeds", type=_seeds, help="explicit seeds for every prompt: '0,1,5' or '0-199' (overrides --seed/-n)")
    g.add_argument("--batch-size", "--gen-batch-size", dest="batch_size", type=int, default=4,
                   help="images per batch (each costs one row per branch)")
    g.add_argument("--resolution", type=int, help="square size (sets height and width)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)

    o = p.add_argument_group("output")
    o.add_argument("--output-dir", "--out", "-o", dest="output_dir", default="samples")
    o.add_argument("--grid", action="store_true", help="also write grid.png (rows = prompts, columns = seeds)")
    o.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _collect_prompts(args: argparse.Namespace) -> list[dict[str, Any]]:
    from diffusion_po.eval.prompts import prompt_rows
    from diffusion_po.sampling.io import parse_weighted, read_prompt_file

    sources = sum(bool(x) for x in (args.prompt, args.prompts, args.prompt_set))
    if sources == 0:
        raise UserError("no prompts: give --prompt TEXT, --prompts FILE or --prompt-set NAME")
    if sources > 1:
        raise UserError("give prompts one way: --prompt, --prompts or --prompt-set")
    if args.prompt:
        rows = [{"prompt": t, "id": i, "negatives": [], "positives": []} for i, t in enumerate(args.prompt)]
    elif args.prompts:
        rows = read_prompt_file(args.prompts)
    else:
        rows = prompt_rows(args.prompt_set)  # raises DataError with the list of known sets
    if args.limit is not None:
        rows = rows[: args.limit]
    negs = [parse_weighted(t) for t in args.negative_prompt]
    poss = [parse_weighted(t) for t in args.positive_prompt]
    for r in rows:
        r["negatives"] = list(r.get("negatives") or []) + negs
        r["positives"] = list(r.get("positives") or []) + poss
    return rows


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from diffusion_po import __version__
    from diffusion_po.families import family_for_pipeline
    from diffusion_po.guidance import make_guidance
    from diffusion_po.sampling.api import (
        check_sampling_settings,
        generate,
        load_sampling_pipeline,
        set_embedded_guidance,
    )
    from diffusion_po.sampling.io import make_grid, png_info, seed_for
    from diffusion_po.sampling.sampler import PromptSpec

    if args.batch_size < 1 or args.num_images_per_prompt < 1:
        raise UserError("--batch-size and --num-images-per-prompt must be >= 1")
    check_sampling_settings(args.steps, args.guidance_rescale, args.limit)
    if args.guidance == "npo" and not (args.npo_lora or args.negative_model):
        raise UserError("--guidance npo needs NPO weights: --npo-lora DIR or --negative-model DIR")
    rows = _collect_prompts(args)
    for r in rows:
        if args.guidance in ("cfg", "npo"):
            if r["positives"]:
                raise UserError(f"--guidance {args.guidance} takes no extra positive prompts; use perp-neg or composable")
            if len(r["negatives"]) > 1:
                raise UserError(f"--guidance {args.guidance} takes one negative prompt (it replaces the empty prompt); "
                                "use --guidance perp-neg or composable for several weighted negatives")
            if r["negatives"] and r["negatives"][0][1] != 1.0:
                raise UserError(f"--guidance {args.guidance}: a negative-prompt weight has no meaning (it replaces the empty prompt); "
                                "use perp-neg or composable for weights")
        if any(w < 0 for _, w in r["negatives"]):
            raise UserError("negative-prompt weights must be >= 0 (they are subtracted): write 'red:1.5', not 'red:-1.5'")

    kinds = ("uncond", "neg") if args.npo_branches == "all" else ("uncond",)
    pipe, negative = load_sampling_pipeline(
        args.model, lora=args.lora, lora_scale=args.lora_scale, npo_lora=args.npo_lora,
        negative_model=args.negative_model, npo_base=args.npo_base, npo_merge_weight=args.npo_merge_weight,
        negative_kinds=kinds, scheduler=args.scheduler, device=args.device, dtype=args.dtype, vae=args.vae,
        network=args.network,
    )
    if args.compile:
        from diffusion_po.families import speed_up_for_sampling

        speed_up_for_sampling(pipe)
        if negative is not None and negative.network is not None:
            from diffusion_po.families import compile_regions

            compile_regions(negative.network, family_for_pipeline(pipe).repeated_blocks)
    fam = set_embedded_guidance(family_for_pipeline(pipe), args.embedded_guidance, args.model)
    dh, dw = fam.default_size()
    height = args.height or args.resolution or dh
    width = args.width or args.resolution or dw
    steps = args.steps or fam.default_steps
    scale = args.guidance_scale if args.guidance_scale is not None else fam.default_guidance_scale
    guidance = make_guidance(args.guidance, scale, args.guidance_rescale)

    n = args.num_images_per_prompt
    specs: list[PromptSpec] = []
    metas: list[dict[str, Any]] = []
    for pi, r in enumerate(rows):
        seeds = r.get("seeds") or args.seeds or [seed_for(args.seed, pi, n, k) for k in range(n)]
        for k, seed in enumerate(seeds):
            specs.append(PromptSpec(r["prompt"], int(seed), r["negatives"], r["positives"]))
            metas.append({"prompt": r["prompt"], "prompt_index": pi, "prompt_id": r.get("id", pi), "k": k,
                          "seed": int(seed),
                          "negatives": [list(x) for x in r["negatives"]], "positives": [list(x) for x in r["positives"]]})
    settings = {
        "model": args.model, "network": args.network, "lora": args.lora, "lora_scale": args.lora_scale if args.lora else None,
        "negative_model": negative.describe() if negative else None,
        **guidance.describe(),
        "scheduler": type(pipe.scheduler).__name__, "steps": steps, "eta": args.eta,
        "height": height, "width": width, "dtype": args.dtype, "compile": args.compile, "family": fam.name,
        "true_cfg": args.true_cfg, "embedded_guidance": getattr(fam, "guidance_scale", None),
        "diffusion_po_version": __version__,
    }

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = (out / "manifest.jsonl").open("w", encoding="utf-8")
    files: list[str | None] = [None] * len(specs)
    bar = tqdm(total=len(specs), desc="sampling", unit="img", disable=args.no_progress)

    def save(indices: list[int], images: list[Any]) -> None:
        for i, img in zip(indices, images):
            meta = {**metas[i], **settings}
            name = f"{i:05d}_p{meta['prompt_index']:04d}_s{meta['seed']}.png"
            meta["file"] = name
            img.save(out / name, pnginfo=png_info(meta))
            files[i] = name
            manifest.write(json.dumps(meta) + "\n")
        manifest.flush()
        bar.update(len(indices))

    try:
        images = generate(fam, specs, guidance=guidance, negative_model=negative, steps=steps, height=height,
                          width=width, batch_size=args.batch_size, eta=args.eta, on_batch=save, true_cfg=args.true_cfg)
    except ValueError as exc:  # bad combinations found while building branches
        raise UserError(str(exc)) from exc
    finally:
        manifest.close()
        bar.close()
    if args.grid:
        cols = max(1, len(specs) // max(1, len(rows))) if all(not r.get("seeds") for r in rows) else min(8, len(specs))
        make_grid(images, cols).save(out / "grid.png")
    print(f"wrote {len(images)} images, manifest.jsonl{' and grid.png' if args.grid else ''} to {out}")
    return 0
