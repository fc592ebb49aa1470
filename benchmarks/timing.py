"""Clocks and memory meters that read the same way on a GPU and on a CPU.

Times are wall-clock seconds around a call, with ``torch.cuda.synchronize()``
before the clock is read on a GPU. Peak memory is

* GPU: ``torch.cuda.max_memory_allocated()`` over the call (every live tensor:
  parameters, optimizer state, activations, vectors);
* CPU: an approximation, as no allocator statistics exist there: the bytes of
  the resident state (parameters + optimizer state, counted from the tensors)
  plus the peak resident set size above its value at rest, read from
  ``/proc/self/status`` (VmHWM, reset through ``/proc/self/clear_refs``) after
  glibc's mmap threshold is fixed at 64 KiB and ``malloc_trim(0)`` has returned
  free heap pages, so that freed tensors leave the RSS.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

GiB = 2**30


@dataclass(frozen=True)
class Stats:
    """Median, min and max seconds of ``reps`` timed calls."""

    median: float
    min: float
    max: float
    reps: int

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repetitions were."""
        return (self.max - self.min) / self.median if self.median > 0 else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "spread": self.spread}


class Meter:
    """Times and peak memory of calls on one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.rss_accounting = False

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """Seconds of one call of ``fn`` and its result."""
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out

    def time(self, fn: Callable[[], Any], reps: int, warmup: int = 1) -> Stats:
        """Median/min/max seconds of ``reps`` calls after ``warmup`` untimed ones."""
        for _ in range(warmup):
            fn()
        samples = [self.once(fn)[0] for _ in range(reps)]
        return Stats.of(samples)

    # -- memory --------------------------------------------------------------
    def enable_rss_accounting(self) -> None:
        """CPU: make large allocations mmap'd so freeing them lowers the RSS."""
        if self.cuda or self.rss_accounting:
            return
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 1024 * 1024)  # M_TRIM_THRESHOLD
        except OSError:
            pass
        self.rss_accounting = True

    @staticmethod
    def _trim() -> None:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # free heap pages leave the RSS
        except OSError:
            pass

    def peak(self, fn: Callable[[], Any], state_bytes: int) -> int:
        """Peak bytes while ``fn()`` runs (see the module docstring)."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        self.enable_rss_accounting()
        self._trim()
        rest = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return state_bytes + max(0, _proc_status("VmHWM") - rest)


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def tensor_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the parameters, buffers and optimizer state (the resident state)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    found = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return (found.group(1) if found else re.sub(r"[^A-Za-z0-9]+", "_", name)).lower()


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["gpu_memory_GiB"] = torch.cuda.get_device_properties(device).total_memory / GiB
    return info
