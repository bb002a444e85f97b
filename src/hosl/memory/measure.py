"""Per-party memory measurement: exact live-tensor bytes on CPU, the CUDA allocator on GPU.

In-process, the client and the server share one allocator and one process, so neither RSS nor
`torch.cuda.max_memory_allocated` alone says which party used what. A `PartyMeter` therefore
counts, for its own party, the bytes of every tensor storage that party allocated while one of its
phases was active, and adds them to the bytes the party holds outside any phase (its *resident*
bytes: parameters, gradients, optimizer state, set by the caller).

How the counting works (`_StorageTracker`): a `TorchDispatchMode` sees every aten op below
autograd, so it sees the same ops under `torch.inference_mode()`, in a forward that records a
graph, and in the backward pass (the autograd engine carries the dispatch mode into backward).
Each output tensor's untyped storage is counted once, at its full size, unless it is one of the
op's inputs' storages (views, in-place and `out=` ops allocate nothing). A weak reference on the
storage's Python object fires when the storage is freed — torch keeps that object alive exactly as
long as the storage — and the bytes are subtracted. So views never double count, tensors saved for
backward stay counted until backward frees them, and gradients created by backward are counted.

What it does not see: memory a kernel allocates and frees internally without returning it as a
tensor (e.g. fused attention workspaces), allocator rounding and fragmentation, and storages
allocated while no phase is active. Put every piece of a party's work inside one of its phases.

Tensors that outlive the phase that made them (activations handed to the other party, gradients,
optimizer state created by the first `step()`) keep being counted — in `current_bytes` and in the
peak of every later phase — until they are freed. To move long-lived state into the resident
figure instead, call `set_resident_state(module, optimizer)`: it sets the resident bytes from the
module's state and stops counting those storages as transient, so nothing is counted twice.

On CUDA a phase's peak comes from the allocator instead (what papers report): the party's bytes at
phase entry plus `max_memory_allocated()` growth during the phase. Peak statistics are reset when
a phase starts, so nested or interleaved meters on one GPU fold the global peak before each reset.
"""

from __future__ import annotations

import resource
import sys
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _disable_current_modes,
    _get_current_dispatch_mode_stack,
)

__all__ = [
    "PartyMeter",
    "module_state_bytes",
    "peak_rss_bytes",
    "tensor_bytes",
]


def _storage_key(storage: torch.UntypedStorage) -> int:
    # The address of the C++ StorageImpl: unique among live storages, unlike data_ptr, which is 0
    # for every empty storage.
    return storage._cdata


def _dense(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The strided tensors holding `tensor`'s memory: itself, or a sparse COO tensor's indices
    and values (embedding gradients of a fused update are sparse; they have no one storage)."""
    if tensor.layout == torch.strided:
        yield tensor
    elif tensor.layout == torch.sparse_coo:
        yield tensor._indices()
        yield tensor._values()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and repeats counted once)."""
    seen: dict[int, int] = {}
    for tensor in (d for t in tensors if t is not None for d in _dense(t)):
        storage = tensor.untyped_storage()
        seen[_storage_key(storage)] = storage.nbytes()
    return sum(seen.values())


def _state_tensors(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, buffers: bool
) -> Iterator[torch.Tensor]:
    for param in module.parameters():
        yield param
        if param.grad is not None:
            yield param.grad
    if buffers:
        yield from module.buffers()
    if optimizer is not None:
        # float32 master copies of bf16 parameters (hosl.master_weights) are optimizer state too
        yield from getattr(optimizer, "master_weights", ())
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    yield value


def module_state_bytes(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    buffers: bool = True,
) -> int:
    """Bytes a party holds between steps: parameters, their gradients, buffers, optimizer state.

    Storages are counted once, so tied weights (input embedding = output head) count once.
    """
    return tensor_bytes(_state_tensors(module, optimizer, buffers))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (whole process, all parties)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


class _StorageTracker:
    """Live bytes of the storages allocated under its dispatch mode, with a resettable peak."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        # key -> [nbytes, weakref]; the weakref must stay referenced for its callback to fire.
        self._storages: dict[int, list] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def _freed(self, key: int) -> None:
        entry = self._storages.pop(key, None)
        if entry is not None:
            self.live -= entry[0]

    def forget(self, tensors: Iterable[torch.Tensor]) -> None:
        """Stop counting these tensors' storages (they are now part of the resident bytes)."""
        for tensor in (d for t in tensors for d in _dense(t)):
            self._freed(_storage_key(tensor.untyped_storage()))
        self.peak = max(self.peak, self.live)

    def record(self, outputs: object, args: tuple, kwargs: dict) -> None:
        # Most ops return one tensor; skip the generator for them (this runs for every op).
        if type(outputs) is torch.Tensor and outputs.layout == torch.strided:
            self._record_one(outputs, args, kwargs)
        else:
            for tensor in _tensors_in(outputs):
                self._record_one(tensor, args, kwargs)
        if self.live > self.peak:
            self.peak = self.live

    def _record_one(self, tensor: torch.Tensor, args: tuple, kwargs: dict) -> None:
        if tensor.device.type != self.device_type:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        nbytes = storage.nbytes()
        entry = self._storages.get(key)
        if entry is not None:
            # A tracked storage resized in place (resize_, out= ops) changes its footprint.
            self.live += nbytes - entry[0]
            entry[0] = nbytes
            return
        if nbytes == 0 or _is_input_storage(key, args, kwargs):
            # Nothing allocated, or a view of / in-place write to storage that predates the op.
            return
        ref = weakref.ref(storage, lambda _ref, key=key: self._freed(key))
        self._storages[key] = [nbytes, ref]
        self.live += nbytes


def _is_input_storage(key: int, args: tuple, kwargs: dict) -> bool:
    for tensor in _tensors_in(args):
        if tensor.untyped_storage()._cdata == key:
            return True
    return any(t.untyped_storage()._cdata == key for t in _tensors_in(tuple(kwargs.values())))


def _tensors_in(value: object) -> Iterator[torch.Tensor]:
    # Op arguments and results are tensors, scalars, or (nested) lists/tuples of them.
    if isinstance(value, torch.Tensor):
        yield from _dense(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


class _TrackingMode(TorchDispatchMode):
    """Dispatch mode that hands every op's outputs to a tracker.

    When another meter's mode is already active (a party's phase nested inside the other party's),
    the op runs with all modes disabled so that only the innermost meter counts it.
    """

    def __init__(self, tracker: _StorageTracker, isolate: bool) -> None:
        super().__init__()
        self.tracker = tracker
        self.isolate = isolate

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with _disable_current_modes() if self.isolate else nullcontext():
            outputs = func(*args, **kwargs)
        self.tracker.record(outputs, args, kwargs)
        return outputs


@dataclass
class _ActivePhase:
    name: str
    peak: int


class PartyMeter:
    """Peak memory of one party (client or server), phase by phase.

    Usage::

        meter = PartyMeter("client")
        meter.set_resident_state(client_module)      # parameters (+ grads, optimizer state)
        with meter.phase("zo_estimate"):
            ...                                      # forward passes under inference_mode
        meter.peak_bytes, meter.phase_peaks()

    A phase's peak is resident bytes + the party's tracked live bytes at their highest during the
    phase. Phases may nest and repeat; the meter keeps the maximum per phase name.
    """

    def __init__(self, name: str, device: torch.device | str = "cpu") -> None:
        self.name = name
        self.device = torch.device(device)
        self.method = "allocator" if self.device.type == "cuda" else "tensors"
        self._tracker = _StorageTracker(self.device.type)
        self._resident = 0
        self._peaks: dict[str, int] = {}
        self._active: list[_ActivePhase] = []
        self._mode: _TrackingMode | None = None
        # CUDA only: allocator bytes and party bytes at the last peak reset.
        self._alloc_base = 0
        self._party_base = 0

    # -- resident bytes ------------------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        return self._resident

    def set_resident(self, nbytes: int) -> None:
        """Set the bytes held outside any phase. Tracked transient storages are not touched."""
        self._fold()
        self._resident = int(nbytes)
        self._mark()

    def set_resident_state(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> int:
        """Set resident bytes to `module_state_bytes(module, optimizer)` and stop counting those
        storages as transient (e.g. gradients and optimizer state made inside a phase).

        Returns the new resident bytes. Call it again after steps that change the state's size.
        """
        self._fold()
        tensors = list(_state_tensors(module, optimizer, buffers=True))
        self._tracker.forget(tensors)
        self._resident = tensor_bytes(tensors)
        self._mark()
        return self._resident

    # -- phases -------------------------------------------------------------------------------

    @property
    def transient_bytes(self) -> int:
        """Bytes of tracked storages still alive (allocated inside a phase, not yet freed)."""
        return self._tracker.live

    @property
    def current_bytes(self) -> int:
        return self._resident + self._tracker.live

    @contextmanager
    def phase(self, name: str) -> Iterator[PartyMeter]:
        """Track this party's allocations inside the block; record the block's peak under `name`."""
        self._fold()
        self._active.append(_ActivePhase(name, self.current_bytes))
        outermost = self._mode is None
        if outermost:
            isolate = any(isinstance(m, _TrackingMode) for m in _get_current_dispatch_mode_stack())
            self._mode = _TrackingMode(self._tracker, isolate)
            self._mode.__enter__()
        self._mark()
        try:
            yield self
        finally:
            if outermost:
                self._mode.__exit__(None, None, None)
                self._mode = None
            self._fold()
            done = self._active.pop()
            self._peaks[done.name] = max(self._peaks.get(done.name, 0), done.peak)
            self._mark()

    def _mark(self) -> None:
        """Start a new peak window at the current state."""
        self._tracker.reset_peak()
        if self.method == "allocator":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._alloc_base = torch.cuda.memory_allocated(self.device)
            self._party_base = self.current_bytes

    def _fold(self) -> None:
        """Fold the peak of the current window into every active phase."""
        if not self._active:
            return
        if self.method == "allocator":
            torch.cuda.synchronize(self.device)
            growth = torch.cuda.max_memory_allocated(self.device) - self._alloc_base
            window_peak = self._party_base + max(growth, 0)
        else:
            window_peak = self._resident + self._tracker.peak
        for active in self._active:
            active.peak = max(active.peak, window_peak)

    # -- results ------------------------------------------------------------------------------

    def phase_peaks(self) -> dict[str, int]:
        """Highest bytes seen in each phase name, resident bytes included."""
        return dict(self._peaks)

    @property
    def peak_bytes(self) -> int:
        """Max over all phases of resident + transient bytes; the resident bytes if no phase ran."""
        return max([self._resident, *self._peaks.values()])

    def reset(self) -> None:
        """Forget recorded peaks (resident bytes and still-live tracked storages are kept)."""
        self._peaks.clear()
