"""Asynchronous checkpoints: what accelerate's `save_state` writes, copied to host memory in a moment and
written by a background thread while training goes on.

- `supported(accelerator)`: None when the snapshot below reproduces `save_state` (one process or DDP, no
  FSDP/DeepSpeed/Megatron/XLA, no save-state hooks), else why not.
- `write_small_state(accelerator, folder)`: accelerate's own `save_accelerator_state` for what each process
  writes itself (RNG states, grad scaler, samplers), at once: small files, taken at the checkpoint's step.
- `HostCopier`: copies the large state (model, optimizer, schedulers, registered objects) into host buffers
  reused from one checkpoint to the next (pinned with CUDA: the copies are queued on the stream, so the
  host does not wait for them, and a later in-place update runs only after them).
- `AcceleratorSnapshot.write(folder)`: writes those copies under `save_state`'s names with accelerate's
  `save` (main process only, as `save_state` does).
- `BackgroundWriter`: one write at a time in a thread; `wait` joins it and raises its error.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def supported(accelerator: Any) -> str | None:
    """Why the snapshot cannot stand for `accelerator.save_state` here, or None when it can."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM, DistributedType.XLA):
        return f"{kind.value} saves its own sharded state"
    if accelerator._save_model_state_pre_hook:
        return "a save_state hook is registered"
    project = accelerator.project_configuration
    if project.automatic_checkpoint_naming or project.save_on_each_node:
        return "accelerate's automatic_checkpoint_naming/save_on_each_node is set"
    return None


def write_small_state(accelerator: Any, folder: Path) -> None:
    """What every process writes for itself in `save_state` (its RNG states, the grad scaler, sampler states),
    through accelerate's own writer with no models, optimizers or schedulers."""
    from accelerate.checkpointing import save_accelerator_state

    folder.mkdir(parents=True, exist_ok=True)
    save_accelerator_state(str(folder), [], [], [], accelerator._dataloaders, accelerator.process_index,
                           accelerator.step, accelerator.scaler)


class HostCopier:
    """Copies nested state (dicts, lists and tuples of tensors and plain values) to host memory.

    Device tensors go into pinned buffers kept per position (reused by the next checkpoint, which waits for
    the previous write first), copied without blocking the host; host tensors are copied into kept buffers
    too; other values are deep-copied. Strides are kept (channels-last optimizer moments stay channels-last
    after a resume, as with `torch.save` of the live tensors), and tensors sharing storage (one tensor under
    two names) share one copy, which accelerate's safetensors writer deduplicates as it would the originals."""

    def __init__(self) -> None:
        self._pool: dict[tuple[Any, ...], tuple[torch.Tensor, bool]] = {}
        self._shared: dict[tuple[Any, ...], torch.Tensor] = {}
        self._devices: set[torch.device] = set()
        self.pin = torch.cuda.is_available()

    def begin(self) -> None:
        self._shared, self._devices = {}, set()

    def copy(self, obj: Any, path: tuple[Any, ...] = ()) -> Any:
        if torch.is_tensor(obj):
            return self._tensor(obj.detach(), path)
        if type(obj) in (dict, OrderedDict):
            out = type(obj)()
            for k, v in obj.items():
                out[k] = self.copy(v, (*path, k))
            return out
        if type(obj) in (list, tuple):
            items = [self.copy(v, (*path, i)) for i, v in enumerate(obj)]
            return items if type(obj) is list else tuple(items)
        return copy.deepcopy(obj)

    def _tensor(self, t: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
        if t.layout != torch.strided:
            return t.to("cpu", copy=True)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if key in self._shared:
            return self._shared[key]
        dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        stride = t.stride() if dense else torch.empty(t.shape, device="meta").stride()
        pinned = self.pin and t.is_cuda
        kept = self._pool.get(path)
        if kept is not None and kept[1] == pinned and kept[0].dtype == t.dtype and kept[0].shape == t.shape \
                and kept[0].stride() == stride:
            buf = kept[0]
        else:
            buf = torch.empty_strided(t.shape, stride, dtype=t.dtype, pin_memory=pinned)
            self._pool[path] = (buf, pinned)
        buf.copy_(t, non_blocking=pinned)
        if t.is_cuda:
            self._devices.add(t.device)
        self._shared[key] = buf
        return buf

    def done(self) -> list[Any]:
        """CUDA events after the queued copies (the writer waits on them before it reads the buffers)."""
        events = []
        for device in self._devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return events

    @property
    def nbytes(self) -> int:
        return sum(b.untyped_storage().nbytes() for b, _ in self._pool.values())


@dataclass
class AcceleratorSnapshot:
    """Host copies of the large part of what `save_state` writes (the main process's files)."""

    models: list[dict[str, torch.Tensor]]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    custom: list[dict[str, Any]]
    extra: Any = None
    """Whatever else the caller copied in the same pass (sharing copies with the state above)."""
    ready: list[Any] = field(default_factory=list)

    @classmethod
    def take(cls, accelerator: Any, copier: HostCopier, extra: Any = None) -> AcceleratorSnapshot:
        """Copy the state `save_state` would write now (in its order: models, optimizers, schedulers,
        registered objects), and `extra`."""
        acc = accelerator
        copier.begin()
        snap = cls(
            models=[copier.copy(acc.get_state_dict(m, unwrap=False), ("model", i)) for i, m in enumerate(acc._models)],
            optimizers=[copier.copy(o.state_dict(), ("optimizer", i)) for i, o in enumerate(acc._optimizers)],
            schedulers=[copier.copy(s.state_dict(), ("scheduler", i)) for i, s in enumerate(acc._schedulers)],
            custom=[copier.copy(o.state_dict(), ("custom", i)) for i, o in enumerate(acc._custom_objects)],
            extra=copier.copy(extra, ("extra",)),
        )
        snap.ready = copier.done()
        acc.project_configuration.iteration += 1  # as save_state counts its saves
        return snap

    def wait_ready(self) -> None:
        for event in self.ready:
            event.synchronize()

    def write(self, folder: Path) -> None:
        """The files `save_state` writes besides `write_small_state`'s, under its names, with accelerate's `save`
        (which writes on the main process only)."""
        from accelerate import checkpointing
        from accelerate.utils import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, SCHEDULER_NAME

        self.wait_ready()
        for i, state in enumerate(self.models):
            name = SAFE_WEIGHTS_NAME if i == 0 else SAFE_WEIGHTS_NAME.replace(".", f"_{i}.")
            checkpointing.save(state, folder / name, safe_serialization=True)
        for i, state in enumerate(self.optimizers):
            checkpointing.save(state, folder / (f"{OPTIMIZER_NAME}.bin" if i == 0 else f"{OPTIMIZER_NAME}_{i}.bin"))
        for i, state in enumerate(self.schedulers):
            checkpointing.save(state, folder / (f"{SCHEDULER_NAME}.bin" if i == 0 else f"{SCHEDULER_NAME}_{i}.bin"))
        for i, state in enumerate(self.custom):
            checkpointing.save(state, folder / f"custom_checkpoint_{i}.pkl")


class BackgroundWriter:
    """Runs one write at a time in a background thread; `wait` joins it and raises what it raised."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.folder: Path | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def start(self, folder: Path, work: Callable[[], None]) -> None:
        if self._thread is not None:
            raise RuntimeError("a checkpoint write is still running; wait for it first")
        self.folder, self._error = folder, None
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"write {folder.name}", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # handed to the main thread by `wait`
            self._error = exc

    def wait(self) -> None:
        if self._thread is None:
            return
        self._thread.join()
        self._thread, error, self._error = None, self._error, None
        if error is not None:
            raise error
