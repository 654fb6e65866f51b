"""`diffusion-po bench`: training and sampling throughput against the reference recipes, in one process.

    diffusion-po bench --size tiny                      # CPU, seconds (CI)
    diffusion-po bench --size full --json bench.json    # GPU: SD1.5, SDXL, SD3-size networks
    diffusion-po bench --size full --cases sd15-dpo-full,sd15-sampling --set compile=none

See docs/performance.md for what each case measures and the targets.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from diffusion_po.bench.cases import CASES

    parser = sub.add_parser(
        "bench", help="benchmark training and sampling against the reference recipes (pairs/s, memory, MFU)",
        description="Random-initialised networks at real size (--size full, GPU) or tiny size (--size tiny, CPU): "
                    "our trainer step and sampler against the reference recipes run in the same process; "
                    "prints a table and writes JSON. Cases: " + ", ".join(CASES),
    )
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny",
                        help="tiny: CPU-sized networks (fast, for CI); full: SD1.5/SDXL/SD3-size networks (GPU)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated cases (default: all): " + ", ".join(CASES))
    parser.add_argument("--json", dest="json_path", default=None,
                        help="write the results here (default bench-<size>.json; rewritten after each case)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per measurement (default 10 GPU, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 3 GPU, 1 CPU)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:1 or cpu (default: cuda if available)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference recipes (our path only)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="trainer config key for our path (repeatable), e.g. --set compile=none")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusion_po.bench.runner import Settings, run_bench
    from diffusion_po.config import parse_override
    from diffusion_po.errors import UserError

    if args.steps < 0 or args.warmup < 0:
        raise UserError("--steps and --warmup must not be negative")
    overrides = dict(parse_override(text) for text in args.overrides)
    if any("." in key for key in overrides):
        raise UserError("--set takes top-level trainer keys (speed switches), e.g. compile=none")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA GPU here; use --device cpu (with --size tiny)")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    settings = Settings(size=args.size, device=args.device, steps=args.steps, warmup=args.warmup,
                        reference=not args.no_reference, overrides=overrides)
    path = args.json_path or f"bench-{args.size}.json"
    run_bench(cases, settings, path)
    print(f"results: {path}")
    return 0
