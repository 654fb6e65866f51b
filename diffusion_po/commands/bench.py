"""`diffusion-po bench`: training and sampling throughput against the reference recipes, in one process.

    diffusion-po bench --size tiny                      # CPU, seconds (CI)
    diffusion-po bench --size full --json bench.json    # GPU: SD1.5, SDXL, SD3-size networks
    diffusion-po bench --size full --cases sd15-dpo-full,sd15-sampling --set compile=none
    diffusion-po bench gpu --out DIR                    # the prepared GPU run: stages, one process each

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
    _register_gpu(parser.add_subparsers(dest="bench_command", metavar="[gpu]"))


def _register_gpu(sub: argparse._SubParsersAction) -> None:
    from diffusion_po.bench.stages import DEFAULT_STAGES, stage_names

    gpu = sub.add_parser(
        "gpu", help="the prepared GPU measurement: stages in priority order, one process and time cap each",
        description="Runs the stages in order, each in its own process under its own time cap, within --budget-s; "
                    "each writes OUT/<stage>.json when it finishes, OUT/summary.json is rewritten after every "
                    "stage, and a markdown summary is printed last. Exit status 0 only when every stage finished. "
                    "Stages: " + ", ".join(stage_names()) + f" (default: {','.join(DEFAULT_STAGES)}).",
    )
    gpu.add_argument("--out", required=True, help="folder for the results (<stage>.json, summary.json)")
    gpu.add_argument("--budget-s", type=float, default=480.0,
                     help="seconds for the whole run (default 480, under the device tool's 600 s per command)")
    gpu.add_argument("--size", choices=["tiny", "full"], default="full",
                     help="full: SD1.5/SDXL-size networks on a GPU (default); tiny: the CPU dry run of the code path")
    gpu.add_argument("--device", default="auto", help="cuda, cuda:1 or cpu (default: cuda if available)")
    gpu.add_argument("--stages", default=None, help="comma-separated stages, in the order to run them")
    gpu.add_argument("--steps", type=int, default=0, help="timed steps per measurement (default 5 GPU, 1 CPU)")
    gpu.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 2 GPU, 1 CPU)")
    gpu.add_argument("--profile-steps", type=int, default=3, help="steps of the kernel profile (0: none)")
    gpu.add_argument("--cap", dest="caps", action="append", default=[], metavar="STAGE=SECONDS",
                     help="a stage's time cap (repeatable)")
    gpu.add_argument("--compile-cache", default=None,
                     help="compile cache root shared by the stages (default: a new temporary folder, removed after, "
                          "so the cold stage is cold)")
    gpu.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="trainer config key for our path in the training stages (repeatable)")
    gpu.set_defaults(func=run_gpu)


def run_gpu(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffusion_po.bench.stages import DEFAULT_STAGES, GpuBenchOptions, run_gpu_bench, stage_names
    from diffusion_po.config import parse_override
    from diffusion_po.errors import UserError

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else DEFAULT_STAGES
    unknown = [s for s in stages if s not in stage_names()]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(stage_names())}")
    caps: dict[str, float] = {}
    for text in args.caps:
        name, _, value = text.partition("=")
        try:
            caps[name] = float(value)
        except ValueError:
            raise UserError(f"--cap {text}: expected STAGE=SECONDS, e.g. --cap sdpa=60") from None
        if name not in stages:
            raise UserError(f"--cap {text}: '{name}' is not one of the stages run ({', '.join(stages)})")
    for text in args.overrides:
        key, _ = parse_override(text)
        if "." in key:
            raise UserError("--set takes top-level trainer keys (speed switches), e.g. compile=none")
    if args.steps < 0 or args.warmup < 0 or args.budget_s <= 0:
        raise UserError("--steps and --warmup must not be negative, --budget-s must be positive")
    import torch

    gpu = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA GPU here; use --device cpu --size tiny")
    if args.size == "full" and not gpu:
        raise UserError("--size full needs a GPU (SD1.5/SDXL-size networks); on the CPU use --size tiny")
    steps, warmup = args.steps or (5 if gpu else 1), args.warmup or (2 if gpu else 1)
    opts = GpuBenchOptions(out=Path(args.out), budget_s=args.budget_s, size=args.size, device=args.device,
                           stages=stages, steps=steps, warmup=warmup, profile_steps=args.profile_steps, caps=caps,
                           compile_cache=args.compile_cache, overrides=list(args.overrides))
    return run_gpu_bench(opts)


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
