"""`diffusion-po configs list|show NAME`: the training recipes shipped inside the package.

    diffusion-po configs list                  # names, with the method and base model of each
    diffusion-po configs show sd15_dpo_lora    # the YAML text (redirect it to a file to edit a copy)

Any name listed here also works in place of a file: `diffusion-po train sd15_dpo_lora`.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("configs", help="list or print the training recipes shipped with the package",
                            description="The training recipes shipped with diffusion-po (also in a wheel install).")
    parser.set_defaults(func=run, print_configs_help=parser.print_help)
    verbs = parser.add_subparsers(dest="configs_verb", metavar="SUBCOMMAND")
    verbs.add_parser("list", help="names of the shipped recipes (with method and model)").set_defaults(func=run_list)
    show = verbs.add_parser("show", help="print one shipped recipe's YAML")
    show.add_argument("name", help="a recipe name from `diffusion-po configs list` (or a config path)")
    show.set_defaults(func=run_show)


def run_list(args: argparse.Namespace) -> int:
    import yaml

    from diffusion_po.shipped import config_names, config_path

    for name in config_names():
        data = yaml.safe_load(config_path(name).read_text()) or {}
        method = data.get("method", "?")
        model = data.get("pretrained_model_name_or_path", "-  (set by `diffusion-po toy run`)")
        print(f"{name:<20} {method:<10} {model}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from diffusion_po.shipped import config_path

    print(config_path(args.name).read_text(), end="")
    return 0


def run(args: argparse.Namespace) -> int:
    """`diffusion-po configs` without a subcommand: its help."""
    args.print_configs_help()
    return 0
