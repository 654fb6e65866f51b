"""The run folder (`output_dir`): one run at a time, no mixing of two runs, and whole-line metrics.

- `RunLock`: an exclusive `fcntl.flock` on `output_dir/.lock` holding the PID (the kernel drops it when
  the process ends, even on kill -9), so two runs never write into one folder.
- `check_run_folder`: `output_dir` must be a folder (or not exist yet, under folders), and a fresh run
  does not start in a folder that holds another run unless asked to replace it (`overwrite_output_dir`).
- `resume_changes`: which config keys differ from the checkpoint's; the ones that change what the
  checkpoint means are refused, the others are returned to be recorded in `resume_history.jsonl`.
- `MetricsLog`: `metrics.jsonl` written one whole line per `write`, trimmed to the resumed step.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from diffusion_po.errors import ConfigError, UserError

LOCK_FILE = ".lock"
HISTORY_FILE = "resume_history.jsonl"
RUN_FILES = ("config.yaml", "metrics.jsonl", HISTORY_FILE)
OUTPUT_ENTRIES = ("pytorch_lora_weights.safetensors", "unet", "transformer", "model_index.json", "validation")

# keys whose change makes the checkpoint mean something else: resume refuses them
MEANING_KEYS = ("method", "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision",
                "variant", "use_lora", "rank", "lora_alpha", "lora_target_modules", "resolution", "use_ema")
# keys that only say how this resume is started; never compared
UNCOMPARED_KEYS = ("resume_from_checkpoint", "overwrite_output_dir")


def check_output_dir(output_dir: Path) -> None:
    """`output_dir` is a folder, or can become one (no file at it or above it)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file, not a folder; choose a folder for the run")
    for parent in output_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"output_dir {output_dir} lies under {parent}, which is a file; "
                                  "choose a folder for the run")
            break


def previous_run(output_dir: Path, logging_dir: str = "logs", leftovers: bool = False) -> list[str]:
    """The names in `output_dir` that belong to a run (config, metrics, checkpoints, outputs, logs);
    with `leftovers` also the hidden half-written folders a kill leaves (which alone are no run)."""
    if not output_dir.is_dir():
        return []
    names = []
    for entry in sorted(output_dir.iterdir()):
        name = entry.name
        hidden = name.startswith((".checkpoint-", ".final"))
        if (name in RUN_FILES or name in OUTPUT_ENTRIES or name == logging_dir or name.startswith("checkpoint-")
                or (leftovers and hidden)):
            names.append(name)
    if (output_dir / "model_index.json").is_file():  # a saved pipeline: its component folders too
        try:
            index = json.loads((output_dir / "model_index.json").read_text())
            names += sorted(k for k in index if not k.startswith("_") and (output_dir / k).exists() and k not in names)
        except ValueError:
            pass
    return names


def check_run_folder(output_dir: Path, resume: bool, overwrite: bool, logging_dir: str = "logs") -> None:
    """Refuse a fresh run into a folder that holds a run, unless `overwrite`."""
    check_output_dir(output_dir)
    if resume or overwrite:
        return
    found = previous_run(output_dir, logging_dir)
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise UserError(f"output_dir {output_dir} already holds a run ({shown}); continue it with --resume, "
                        "choose another output_dir, or replace it with --overwrite (overwrite_output_dir: true)")


def clear_run_folder(output_dir: Path, logging_dir: str = "logs") -> list[str]:
    """Remove what a run wrote in `output_dir` (only that: other files stay). Returns the names removed."""
    names = previous_run(output_dir, logging_dir, leftovers=True)
    for name in names:
        _remove(output_dir / name)
    return names


FINAL_STAGING = ".final.partial"
_OLD = ".final.old-"


def publish(staging: Path, output_dir: Path) -> None:
    """Move each entry of a finished staging folder into `output_dir` with one rename each: a file
    replaces the old one atomically; a folder's old version is first renamed aside, so a kill leaves the
    old folder (restored by `recover_final`) or the new one, never a half-written one."""
    for entry in sorted(staging.iterdir()):
        target = output_dir / entry.name
        if entry.is_dir() and target.exists():
            aside = output_dir / f"{_OLD}{entry.name}"
            _remove(aside)
            os.replace(target, aside)
            os.replace(entry, target)
            _remove(aside)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    staging.rmdir()


def recover_final(output_dir: Path) -> None:
    """After a kill in `publish`: put an old output folder back where no new one arrived; drop the staging."""
    if not output_dir.is_dir():
        return
    for aside in output_dir.glob(f"{_OLD}*"):
        target = output_dir / aside.name[len(_OLD):]
        if target.exists():
            _remove(aside)
        else:
            os.replace(aside, target)
    _remove(output_dir / FINAL_STAGING)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class RunLock:
    """An exclusive lock on a run folder: `output_dir/.lock` with the holder's PID and host."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"output_dir {self.path.parent} is in use by another run ({holder}); wait for it to "
                            "end or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def probe(self) -> None:
        """Raise if another run holds the lock now (without keeping it)."""
        if self.path.is_file():
            self.acquire()
            self.release()


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys (`data.data_files`)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "method_options":
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _effective(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(cfg)
    if cfg.get("lora_alpha") is None:
        cfg["lora_alpha"] = cfg.get("rank")  # the default alpha is the rank
    return cfg


def resume_changes(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """Compare the checkpoint's config with this run's: raise on a key that changes what the checkpoint
    means (MEANING_KEYS, and fp16 on one side only: its grad-scaler state); return the others that differ
    as {key: [checkpoint value, new value]}."""
    old, new = flat(_effective(saved)), flat(_effective(current))
    for key in MEANING_KEYS:
        if old.get(key) != new.get(key):
            raise ConfigError(f"{checkpoint} was trained with {key}: {old.get(key)!r}, the config has "
                              f"{new.get(key)!r}; resume with the checkpoint's value, or start a new output_dir")
    mp = old.get("mixed_precision"), new.get("mixed_precision")
    if mp[0] != mp[1] and "fp16" in mp:
        raise ConfigError(f"{checkpoint} was trained with mixed_precision: {mp[0]!r}, the config has {mp[1]!r}; "
                          "a change to or from fp16 cannot resume (the fp16 grad scaler's state); keep "
                          f"{mp[0]!r} or start a new output_dir")
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
            if k not in UNCOMPARED_KEYS and old.get(k) != new.get(k)}


def read_config(path: Path) -> dict[str, Any] | None:
    """A config.yaml written by `save_config`, or None when there is none (or it is unreadable)."""
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def resume_row(checkpoint: Path | None, step: int, changes: dict[str, list[Any]]) -> dict[str, Any]:
    """The `resume_history.jsonl` row of one resume: when, from where, and the keys it changed."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step,
            "checkpoint": checkpoint.name if checkpoint else None, "changed": changes}


class MetricsLog:
    """A jsonl file written one whole line at a time (one `write` per row, on an O_APPEND descriptor);
    a row that cannot be written whole (a full disk) is cut off again, so no torn line stays."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a torn line (a kill or a full disk mid-write)
                continue
            if isinstance(row, dict):
                out.append(row)
        return out

    def trim(self, step: int) -> int:
        """Keep the whole rows of steps up to `step` (those of undone steps and torn lines go); returns
        how many rows were dropped. Written to a temporary file and renamed."""
        if not self.path.is_file():
            return 0
        total = len(self.path.read_text(errors="replace").splitlines())
        keep = [r for r in self.rows() if isinstance(r.get("step"), int) and r["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)
        return total - len(keep)

    def append(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            before = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(28, "No space left on device (short write)", str(self.path))
            except OSError:
                os.ftruncate(fd, before)
                raise
        finally:
            os.close(fd)
