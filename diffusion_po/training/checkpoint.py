"""Checkpoints: accelerate `save_state` into `output_dir/checkpoint-N`, written atomically, verified and rotated.

A checkpoint is first written to a hidden temporary folder and renamed into place only once complete,
so a kill mid-write never leaves a half-written `checkpoint-N` and never touches the previous one.
Before the rename a `manifest.json` lists every file with its size and sha256; a resume verifies it and
falls back to the newest checkpoint that passes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from diffusion_po.errors import UserError

logger = logging.getLogger("diffusion_po.train")

_CKPT = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"


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


def resolve_resume(output_dir: str | Path, resume: str | None,
                   report: Callable[[str], None] = logger.warning) -> Path | None:
    """`latest` -> the newest checkpoint that passes `verify` (None if there is none yet; damaged newer ones
    are reported and skipped); a named checkpoint must exist and pass."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        damaged = []
        for path in reversed(ckpts):
            problem = verify(path)
            if problem is None:
                if damaged:
                    report(f"{'; '.join(damaged)}: resuming from {path.name}, the newest good checkpoint")
                return path
            damaged.append(f"{path} is damaged ({problem})")
        if damaged:
            raise UserError(f"no usable checkpoint in {output_dir}: {'; '.join(damaged)}; "
                            "start a new run (another output_dir, or --overwrite)")
        return None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume
    if not path.is_dir():
        raise UserError(
            f"resume_from_checkpoint: '{resume}' does not exist; give a checkpoint folder, or 'latest' "
            f"(checkpoints found in {output_dir}: {[p.name for p in list_checkpoints(output_dir)] or 'none'})"
        )
    step_of(path)
    problem = verify(path)
    if problem is not None:
        raise UserError(f"{path} is damaged ({problem}); resume from another checkpoint, or use 'latest' "
                        "to take the newest good one")
    return path


def _sha256(path: Path, sync: bool = False) -> str:
    """The file's sha256; with `sync` its data is also flushed to the disk (fsync)."""
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if sync:
            os.fsync(fh.fileno())
        return digest


def write_manifest(folder: str | Path) -> None:
    """List every file of a finished (not yet committed) checkpoint with its size and sha256, each file flushed
    to the disk first, so that a committed checkpoint also survives a power cut."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p, sync=True)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    with (folder / MANIFEST).open("w") as fh:
        fh.write(json.dumps({"files": files}, indent=1))
        fh.flush()
        os.fsync(fh.fileno())


def verify(folder: str | Path) -> str | None:
    """What is wrong with a checkpoint (a missing, truncated or changed file), or None when it matches its
    manifest. A checkpoint without a manifest (written before manifests existed) passes unverified."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        logger.warning("%s has no %s (an older checkpoint): it is not verified", folder, MANIFEST)
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest says {entry['size']}"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error (or its cause) is a full disk or quota: ENOSPC/EDQUOT, torch's zip writer
    (`inline_container.cc`), safetensors' `StorageFull`."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if any(s in text for s in ("inline_container", "file write failed", "No space left", "StorageFull")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full_message(where: str | Path, needed_bytes: int | None = None) -> str:
    """One line: the disk is full, where, how much is free and (for a checkpoint) how much one needs."""
    root = Path(where)
    while not root.exists() and root != root.parent:
        root = root.parent
    free = shutil.disk_usage(root).free
    need = f"; a checkpoint needs about {needed_bytes / 2**30:.2f} GiB" if needed_bytes is not None else ""
    return (f"the disk is full: writing {where} failed with {free / 2**30:.2f} GiB free on the file system of "
            f"{root}{need}. Free space, lower checkpoints_total_limit or move output_dir, then --resume "
            "(what was half written was removed; the last complete checkpoint is kept)")


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def temporary_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f".checkpoint-{step}.partial"


def commit(output_dir: str | Path, step: int) -> Path:
    """Rename the finished temporary folder into `checkpoint-step` (atomic on one file system)."""
    tmp = temporary_dir(output_dir, step)
    final = Path(output_dir) / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)  # the rename itself, on the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def rotate(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `total_limit`, and stale partial folders."""
    removed = []
    for stale in Path(output_dir).glob(".checkpoint-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    if total_limit is None:
        return removed
    ckpts = list_checkpoints(output_dir)
    for old in ckpts[: max(0, len(ckpts) - total_limit)]:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed
