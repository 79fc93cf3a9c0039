"""Counting device-to-host synchronisations, on any device, the CPU included.

A GPU runs ahead of the Python program until the program needs a value that only the device has:
then the host waits for the device's queue to drain. `count_host_syncs()` counts the operations
that make the host wait, at the level of the ATen operators (a `TorchDispatchMode`, so operators
called from C++ are seen too, forward and backward), plus the Python-level reads that bypass the
dispatcher (`Tensor.tolist`, `Tensor.numpy`). What is counted (`SyncCounter.by_kind` keys):

- `scalar_read`: `item()`, `bool(t)`, `int(t)`, `float(t)`, `if t:` (ATen `_local_scalar_dense`);
- `data_dependent_shape`: operators whose output shape depends on the values, so the host must
  read them to allocate: `nonzero`, `masked_select`, indexing with a bool mask (`x[mask]`,
  `x[mask] = v`), `repeat_interleave` without `output_size`, `unique`;
- `to_host`: `tolist()`, `numpy()`, and copies from a device to the host;
- `blocking_to_device`: a host-to-device copy without `non_blocking=True` (it waits too).

On the CPU nothing waits, but the same calls are counted: they are the ones that WOULD wait on a
GPU, so a CPU test can hold the count down. Host-device copies are the exception: on a CPU run
`.to("cpu")` is no copy at all, so they are counted only where a device exists.

Not counted: reads of tensors that live on the host on every device, which the caller marks with
`SyncCounter.paused()` (torch's optimisers keep their step counts on the host and read them with
`.item()`; that reads host memory).

Cost: the mode adds about 10 microseconds of host time per operator (measured on this project's 2-core AMD EPYC, family 26:
9% of a tiny model's CPU training step, where operators are smallest; for the demo's model at one
thread, 100 steps with the counter against a no-op stand-in, alternating: 0.279 / 0.227 and 0.255 /
0.210 s per step, 18-23%; a lookup table for the operators' kinds gained nothing measurable, the
mode's own dispatch is the cost); on a GPU that host time overlaps the kernels unless the step is
bound by the host.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_SCALAR_READS = {aten._local_scalar_dense}
_DATA_DEPENDENT = {aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique, aten._unique2,
                   aten.unique_consecutive, aten.unique_dim_consecutive}  # fmt: skip
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_COPIES = {aten._to_copy, aten.copy_}

_local = threading.local()  # the active counters of this thread (innermost last)


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _copy_kind(func: Any, args: tuple, kwargs: dict) -> str | None:
    """to_host / blocking_to_device for a copy between the host and a device; None otherwise."""
    if func.overloadpacket is aten.copy_:
        target, source = args[0], args[1]
        target_device, non_blocking = target.device, (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    else:
        source = args[0]
        target_device = kwargs.get("device") or source.device
        non_blocking = kwargs.get("non_blocking", False)
    if not isinstance(source, torch.Tensor) or torch.device(target_device).type == source.device.type:
        return None
    if torch.device(target_device).type == "cpu":
        return "to_host"
    return None if non_blocking or source.device.type != "cpu" else "blocking_to_device"


def sync_kind(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The kind of host synchronisation an ATen call makes (see the module docstring), or None."""
    packet = func.overloadpacket
    if packet in _SCALAR_READS:
        return "scalar_read"
    if packet in _DATA_DEPENDENT:
        return "data_dependent_shape"
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor:
        output_size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
        return None if output_size is not None else "data_dependent_shape"
    if packet in _INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return "data_dependent_shape" if any(_is_mask(i) for i in indices or ()) else None
    if packet in _COPIES:
        return _copy_kind(func, args, kwargs)
    return None


class SyncCounter(TorchDispatchMode):
    """The host synchronisations seen while active: `total` and `by_kind` (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_kind: Counter[str] = Counter()
        self._paused = 0

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def add(self, kind: str) -> None:
        if not self._paused:
            self.by_kind[kind] += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave out what runs inside (host-side reads, logging)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = sync_kind(func, args, kwargs)
        if kind is not None:
            self.add(kind)
        return func(*args, **kwargs)


def _active() -> list[SyncCounter]:
    if not hasattr(_local, "counters"):
        _local.counters = []
    return _local.counters


_PYTHON_READS = ("tolist", "numpy")
_originals: dict[str, Any] = {}


def _counted_read(name: str):
    original = _originals[name]

    def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        for counter in _active():
            counter.add("to_host")
        return original(self, *args, **kwargs)

    return read


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncCounter]:
    """Count the host synchronisations of the code run inside (this thread's Python reads; every
    ATen operator of this thread and of the autograd threads it starts)."""
    counter = SyncCounter()
    active = _active()
    if not _originals:  # patched once per process; the patched reads count only inside a counter
        for name in _PYTHON_READS:
            _originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, _counted_read(name))
    active.append(counter)
    try:
        with counter:
            yield counter
    finally:
        active.remove(counter)


@contextlib.contextmanager
def not_counted() -> Iterator[None]:
    """Pause every active counter of this thread (host-side reads that are no device wait, logging)."""
    with contextlib.ExitStack() as stack:
        for counter in list(_active()):
            stack.enter_context(counter.paused())
        yield


__all__ = ["SyncCounter", "count_host_syncs", "not_counted", "sync_kind"]
