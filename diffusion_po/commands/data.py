"""`diffusion-po data`: data-set tools.

    diffusion-po data cache CONFIG [--set key=value ...] [--format pickapic] [--output DIR] [--dtype fp16]
    diffusion-po data download 'pickapic_v2_no_images/*.parquet' --out DIR   # image URLs -> a trainable folder

`cache` encodes the config's data set once (VAE posteriors, text conditioning) for `data.format: cache`
(see docs/performance.md). Other subcommands (captions, experts) are registered by their modules.
"""

from __future__ import annotations

import argparse
import importlib

#: (module, function) pairs that add their own `data` subcommands, when the module exists
EXTRA_SUBCOMMANDS = [
    ("diffusion_po.data.captions", "register_captions"),
    ("diffusion_po.data.experts", "register_experts"),
    ("diffusion_po.data.download", "register_download"),
]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="data-set tools: cache (encode once for fast training), ...",
                            description="Data-set tools.")
    parser.set_defaults(func=run, print_data_help=parser.print_help)
    verbs = parser.add_subparsers(dest="data_verb", metavar="SUBCOMMAND")
    cache = verbs.add_parser(
        "cache", help="encode a data set once (VAE latents, text conditioning) to train with data.format: cache",
        description="Encode the config's data set into <data.cache_dir>/<model key>/<resolution>px; then train "
                    "with --set data.format=cache.",
    )
    cache.add_argument("config", help="a training config (its model, resolution, mixed_precision and data section)")
    cache.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable), e.g. --set data.cache_dir=caches")
    cache.add_argument("--format", dest="source_format", default=None,
                       help="the source files' format when the config says data.format: cache")
    cache.add_argument("--output", default=None, help="cache root folder (default: data.cache_dir)")
    cache.add_argument("--batch-size", type=int, default=8, help="images per VAE batch (default 8)")
    cache.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                       help="storage dtype of latents and embeddings (default fp16; fp32 is bit-faithful)")
    cache.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    cache.add_argument("--overwrite", action="store_true", help="redo an existing cache")
    cache.set_defaults(func=run_cache)
    for module_name, function in EXTRA_SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        getattr(module, function)(verbs)


def run_cache(args: argparse.Namespace) -> int:
    from diffusion_po.config import load_train_config
    from diffusion_po.data.cache import write_cache
    from diffusion_po.errors import UserError

    if args.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    cfg = load_train_config(args.config, args.overrides)
    folder = write_cache(cfg, source_format=args.source_format, output=args.output, batch_size=args.batch_size,
                         dtype=args.dtype, device=args.device, overwrite=args.overwrite)
    print(f"cache written to {folder}; train from it with: diffusion-po train {args.config} "
          f"--set data.format=cache --set data.cache_dir={args.output or cfg.data.cache_dir}")
    return 0


def run(args: argparse.Namespace) -> int:
    """`diffusion-po data` without a subcommand: the list of subcommands."""
    args.print_data_help()
    return 0
