"""A fast CLI: `diffusion-po --help`, `--version` and every `VERB --help` import no torch (nor diffusers,
transformers, peft, accelerate, numpy), and start in a small multiple of a bare `python -c pass`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusion_po.cli import VERBS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "numpy")
#: start-up of `diffusion-po --help` over `python -c pass` (min of 3 runs each); the issue's 0.5 s is ~5x here
MAX_RATIO = 5.0


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def imported_modules(*argv: str) -> set[str]:
    """Top-level names of the modules `python -X importtime -m diffusion_po.cli ARGV` imports."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "diffusion_po.cli", *argv],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "no help/version text printed"
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.add(name.split(".")[0])
    assert "diffusion_po" in names, "importtime output not parsed"
    return names


@pytest.mark.parametrize("argv", [("--help",), ("--version",), *((verb, "--help") for verb in VERBS)],
                         ids=lambda argv: " ".join(argv))
def test_help_imports_no_torch(argv):
    heavy = sorted(set(HEAVY) & imported_modules(*argv))
    assert not heavy, f"`diffusion-po {' '.join(argv)}` imports {heavy}; move those imports into the run functions"


def _best_of_3(cmd: list[str]) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=_env(), cwd=REPO, timeout=120)
        times.append(time.perf_counter() - start)
    return min(times)


def test_help_starts_fast():
    bare = _best_of_3([sys.executable, "-c", "pass"])
    cli = _best_of_3([sys.executable, "-m", "diffusion_po.cli", "--help"])
    ratio = cli / bare
    print(f"diffusion-po --help: {cli:.3f} s, python -c pass: {bare:.3f} s, ratio {ratio:.1f}x")
    assert ratio < MAX_RATIO, f"--help takes {ratio:.1f}x a bare interpreter start ({cli:.2f} s vs {bare:.2f} s)"
