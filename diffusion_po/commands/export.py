"""`diffusion-po export lora`: a trained LoRA in the formats other tools load.

    diffusion-po export lora runs/sd15_dpo_lora --format kohya --out sd15_dpo_kohya.safetensors
    diffusion-po export lora runs/flux_dpo_lora --format kohya --family flux --out flux_dpo_kohya.safetensors

kohya keys (with a per-module `.alpha`) load in AUTOMATIC1111 / Forge, ComfyUI, InvokeAI and diffusers'
`load_lora_weights`; `diffusers` writes the stock diffusers file. See docs/training.md ("Exporting a LoRA").
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="export a trained LoRA for other tools (kohya / A1111 / ComfyUI keys)",
                            description="Write trained weights in the formats other tools load.")
    parser.set_defaults(func=run, print_export_help=parser.print_help)
    verbs = parser.add_subparsers(dest="export_verb", metavar="WHAT")
    lora = verbs.add_parser(
        "lora", help="a LoRA (pytorch_lora_weights.safetensors) -> kohya keys with alpha, or diffusers keys",
        description="Convert a diffusers-format LoRA (a training output folder or its .safetensors file) to kohya "
                    "keys with per-module alpha (SD1.x, SDXL, FLUX.1), or copy it as a diffusers file.",
    )
    lora.add_argument("src", help="a folder with pytorch_lora_weights.safetensors, or the .safetensors file")
    lora.add_argument("--format", dest="fmt", choices=["kohya", "diffusers"], default="kohya",
                      help="kohya: sd-scripts keys (A1111, ComfyUI, ...); diffusers: diffusers' keys (default kohya)")
    lora.add_argument("--family", default=None,
                      help="sd, sdxl or flux (default: from the file; a transformer LoRA needs --family flux)")
    lora.add_argument("--out", required=True, help="the .safetensors file to write")
    lora.set_defaults(func=run_lora)


def run_lora(args: argparse.Namespace) -> int:
    from diffusion_po.families.kohya import export_lora

    out = export_lora(args.src, args.out, fmt=args.fmt, family=args.family)
    print(f"{args.fmt} LoRA written to {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    """`diffusion-po export` without a subcommand: the list of subcommands."""
    args.print_export_help()
    return 0
