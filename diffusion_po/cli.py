"""The single `diffusion-po` command. Each verb lives in `diffusion_po/commands/<verb>.py`
and exposes `register(subparsers)`; the verb's handler is stored as `func` on its parser."""

from __future__ import annotations

import argparse
import importlib
import sys

from diffusion_po import __version__

# verb -> module under diffusion_po.commands
VERBS = ["train", "sample", "eval", "bench", "data", "toy", "npo", "export", "configs", "env"]



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusion-po",
        description="Preference fine-tuning of text-to-image diffusion models (DPO, NPO, DCPO, DRO, ...).",
    )
    parser.add_argument("--version", action="version", version=f"diffusion-po {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        module = importlib.import_module(f"diffusion_po.commands.{verb}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from diffusion_po.errors import UserError

    try:
        result = args.func(args)
    except UserError as exc:
        print(f"diffusion-po {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
