"""`diffusion-po train CONFIG [--set key=value ...]`: run a training job (also under `accelerate launch`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a model with a preference method (dpo, npo, dcpo, dro, kto, mapo, ...)",
        description=(
            "Train with the method and data of a YAML config. Any key can be overridden: "
            "--set learning_rate=1e-5 --set data.streaming=true. For several GPUs or nodes run "
            "`accelerate launch -m diffusion_po.cli train CONFIG` (your default accelerate config is respected; "
            "presets in configs/accelerate/)."
        ),
    )
    parser.add_argument("config", help="YAML config file, or a shipped recipe name (`diffusion-po configs list`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable; dotted keys for sections, e.g. data.strict=true)")
    parser.add_argument("--method", help="shortcut for --set method=NAME")
    parser.add_argument("--output-dir", help="shortcut for --set output_dir=DIR")
    parser.add_argument("--resume", nargs="?", const="latest",
                        help="resume (default: the latest good checkpoint; none yet: start from scratch)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in output_dir (= --set overwrite_output_dir=true)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusion_po.config import load_train_config
    from diffusion_po.shipped import config_path
    from diffusion_po.training.trainer import train

    overrides = list(args.overrides)
    if args.method:
        overrides.append(f"method={args.method}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"resume_from_checkpoint={args.resume}")
    if args.overwrite:
        overrides.append("overwrite_output_dir=true")
    cfg = load_train_config(config_path(args.config), overrides)
    train(cfg, config_source=args.config)
    return 0
