"""Checkpoints: accelerate `save_state` into `output_dir/checkpoint-N`, written atomically and rotated.

A checkpoint is first written to a hidden temporary folder and renamed into place only once complete,
so a kill mid-write never leaves a half-written `checkpoint-N` and never touches the previous one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from diffusion_po.errors import UserError

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def step_of(path: str | Path) -> int:
    m = _CKPT.match(Path(path).name)
    if not m:
        raise UserError(f"{path}: not a checkpoint folder (expected a name like checkpoint-500)")
    return int(m.group(1))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`latest` -> newest complete checkpoint (None if there is none yet); a path must exist."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume
    if not path.is_dir():
        raise UserError(
            f"resume_from_checkpoint: '{resume}' does not exist; give a checkpoint folder, or 'latest' "
            f"(checkpoints found in {output_dir}: {[p.name for p in list_checkpoints(output_dir)] or 'none'})"
        )
    step_of(path)
    return path


def temporary_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f".checkpoint-{step}.partial"


def commit(output_dir: str | Path, step: int) -> Path:
    """Rename the finished temporary folder into `checkpoint-step` (atomic on one file system)."""
    tmp = temporary_dir(output_dir, step)
    final = Path(output_dir) / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def rotate(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `total_limit`, and stale partial folders."""
    removed = []
    for stale in Path(output_dir).glob(".checkpoint-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    if total_limit is None or total_limit <= 0:
        return removed
    ckpts = list_checkpoints(output_dir)
    for old in ckpts[: max(0, len(ckpts) - total_limit)]:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed
