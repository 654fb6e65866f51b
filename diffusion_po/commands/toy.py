"""`diffusion-po toy`: reserved; implemented by its own issue."""

from __future__ import annotations

import argparse

from diffusion_po.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("toy", help="(not yet available)", description="Reserved verb.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise UserError("'toy' is not available in this version yet.")
