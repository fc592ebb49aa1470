r"""How much memory a measurement needs, what is free, and where the basis goes.

A measurement's extra memory is a fixed number of parameter-sized vectors plus
one product's activations; it never grows with the number of products
(:func:`~curvwatch.lanczos` keeps at most ``max_basis`` basis vectors). Before
a measurement allocates anything, :func:`plan_memory` compares

.. math::

    \text{need} = n \cdot b \cdot (V_\text{device} + m_\text{device})
                  + \text{activations}

(``n`` parameters of ``b`` bytes, ``V`` working vectors of the operator and
solver, ``m`` basis vectors where they live on the device) with what is allowed:
on CUDA the smaller of the free device memory and ``memory_ratio`` times the
training step's peak, minus what is allocated now; on the host, half of the
available memory. It puts the basis on the device where it fits, else in
page-locked host memory, else shrinks it to ``k + 2`` vectors, else says that
the measurement cannot fit and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from curvwatch.names import GGN_CRITERION, Method

GIB = float(1 << 30)

# Parameter-sized vectors a measurement holds on the compute device besides the
# basis. Finite differences: the saved parameters and the product being formed
# (both gradients of a difference are accumulated into it a parameter at a
# time), the cached gradient at theta, the preconditioner diagonal, and one for
# the Ritz vector and per-tensor temporaries: 5. Counted by tests/planning/test_memory.py
# (every tensor a measurement allocates, tracked on the CPU). Until 2026-12-03 a
# difference also held a flat copy of each gradient, the scaled copy P^{-1/2} v,
# the second gradient of a central difference, the update direction and the
# start vector: 8 (1.56B on an H200: planned 92.2 GiB with 10, added 74.7 GiB).
# Double backward: the flat gradient, the product's per-parameter and flat
# output, the preconditioner, the Ritz vector and its graph's own copies: 7
# (355M on an H200: planned 53.5 GiB, added 48.8 GiB).
WORKING_VECTORS = {
    Method.DOUBLE_BACKWARD: 7, Method.FORWARD_OVER_REVERSE: 8, Method.FINITE_DIFFERENCE: 5,
    Method.FORWARD_DIFFERENCE: 5, GGN_CRITERION: 7,
}

# One product's activations as a multiple of the bytes the probe's own forward
# graph holds (a grad-enabled float32 forward of the probe batch under the
# measurement guard), until the monitor has measured a product of its own
# (ActivationGauge). Double backward keeps the forward's graph, the gradient's
# graph built on it, and the second backward's temporaries; a difference is one
# forward and backward, whose peak is about the forward's graph plus the
# gradients being formed.
PRODUCT_PER_FORWARD = {
    Method.DOUBLE_BACKWARD: 4.0, Method.FORWARD_OVER_REVERSE: 4.0, Method.FINITE_DIFFERENCE: 2.0,
    Method.FORWARD_DIFFERENCE: 2.0, GGN_CRITERION: 3.0,
}

# Share of the host's available memory a measurement may take.
HOST_SHARE = 0.5

# Device memory left free for fragmentation and the allocator's rounding, and
# the share of what is allowed that an estimate may fill.
DEVICE_MARGIN = 2 * GIB
DEVICE_FILL = 0.9

# Most basis vectors kept on the host: its memory is the user's too.
HOST_MAX_VECTORS = 6


@dataclass(frozen=True)
class MemoryPlan:
    """Where a measurement's basis lives and what it is expected to take (bytes).

    Attributes:
        fits: False: the measurement would not fit; ``message`` says why.
        basis_device: ``"cuda"``/``"cpu"``... where the Lanczos basis is kept.
        max_basis: basis vectors kept.
        device_bytes: expected extra bytes on the compute device.
        host_bytes: expected extra bytes on the host (basis kept there).
        allowed_device_bytes: what the device may take.
        message: a one-line account (numbers, and the fix when it does not fit).
    """

    fits: bool
    basis_device: str
    max_basis: int
    device_bytes: float
    host_bytes: float
    allowed_device_bytes: float
    message: str


def format_bytes(count: float) -> str:
    """``count`` bytes in the largest binary unit it reaches: ``"200 B"``, ``"1.5 KiB"``, ``"3.25 GiB"``.

    Three significant digits. A small model's needs read ``"12 KiB"``, never ``"0.00 GiB"``; an
    infinite count (``Budget(max_memory=float("inf"))``) reads ``"no limit"``.
    """
    if not math.isfinite(count):
        return "no limit" if count > 0 else str(count)
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= size:
            return f"{count / size:.3g} {unit}" if abs(count) < 100 * size else f"{count / size:.0f} {unit}"
    return f"{count:.0f} B"


def host_available_bytes() -> float:
    """``MemAvailable`` of ``/proc/meminfo`` (infinity where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def device_allowance(
    device: torch.device, memory_ratio: float | None, training_peak: float | None, host_available: float | None = None
) -> float:
    """Bytes a measurement may add on ``device`` now.

    CUDA: ``min(free, memory_ratio * training_peak - allocated)`` (``free``
    alone without a ratio or a known peak), where free counts the caching
    allocator's unused reserve, less :data:`DEVICE_MARGIN`. CPU:
    ``HOST_SHARE`` of the available host memory (``host_available``; default:
    ``/proc/meminfo``).
    """
    if device.type != "cuda":
        return HOST_SHARE * (host_available_bytes() if host_available is None else host_available)
    free, _ = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - allocated
    free = max(0.0, free - DEVICE_MARGIN)
    if training_peak is None or memory_ratio is None:
        return float(free)
    return float(max(0.0, min(free, memory_ratio * training_peak - allocated)))


class TrainingPeak:
    """The training step's peak CUDA memory: the largest allocator peak seen that is not the monitor's.

    Read when the monitor is built and before each measurement (:meth:`observe`);
    a peak that a measurement set (:meth:`measured`) is skipped, and a reset of
    the allocator's statistics never lowers what was seen. ``None`` off CUDA and
    until a peak was seen.
    """

    def __init__(self) -> None:
        self.value: float | None = None
        self._after_measuring: float | None = None

    def observe(self, device: torch.device) -> None:
        """Take the allocator's peak now, unless a measurement set it."""
        if device.type != "cuda":
            return
        peak = float(torch.cuda.max_memory_allocated(device))
        if self._after_measuring is None or peak > self._after_measuring:
            self.value = max(self.value or 0.0, peak)

    def measured(self, device: torch.device) -> None:
        """Note the allocator's peak as a measurement ends: that one is the monitor's."""
        if device.type == "cuda":
            self._after_measuring = float(torch.cuda.max_memory_allocated(device))


class ActivationGauge:
    """One product's activation bytes, from what the monitor's own work was measured to take.

    The allocator's lifetime peak counts whatever else ran in the process (an
    evaluation pass, generation, a second model, an earlier monitor: 153 GiB
    "of one product's activations" for GPT-2 small on an H200 after another
    monitor had measured), so it is never read here. Instead:

    1. before the first measurement on CUDA, :meth:`gauge_forward` runs the
       probe's loss once with grad and reads ``memory_allocated`` after minus
       before: the bytes its graph holds, ``F``; a product is estimated at
       :data:`PRODUCT_PER_FORWARD` ``x F``;
    2. around each measurement (:meth:`start`, :meth:`finish`): where the
       allocator's peak rose during it, that peak minus what was allocated when
       it started, less the plan's vectors, is what its products' activations
       took, and replaces the estimate for that method; where the peak did not
       rise, the same difference is an upper bound, and lowers a larger estimate.

    On the CPU, and under FSDP (whose forward must be followed by a backward),
    activations are not counted (0): the host's allowance is half its memory.
    """

    def __init__(self) -> None:
        self.forward_bytes: float | None = None
        self.measured: dict[str, float] = {}
        self._start: tuple[float, float] | None = None

    def needs_forward(self, device: torch.device) -> bool:
        """True until the probe's forward has been gauged on a CUDA device."""
        return device.type == "cuda" and self.forward_bytes is None

    def gauge_forward(self, device: torch.device, forward: Callable[[], Any]) -> None:
        """Run ``forward()`` (the probe's loss, with grad) once and keep the bytes its graph holds."""
        before = torch.cuda.memory_allocated(device)
        loss = forward()
        self.forward_bytes = float(max(0, torch.cuda.memory_allocated(device) - before))
        del loss

    def activations(self, method: str) -> float:
        """Estimated activation bytes of one ``method`` product on the whole probe batch."""
        if method in self.measured:
            return self.measured[method]
        if self.forward_bytes is None:
            return 0.0
        return PRODUCT_PER_FORWARD.get(method, 4.0) * self.forward_bytes

    def start(self, device: torch.device) -> None:
        """Note what is allocated, and the allocator's peak, as a measurement starts."""
        if device.type == "cuda":
            self._start = (float(torch.cuda.memory_allocated(device)), float(torch.cuda.max_memory_allocated(device)))

    def finish(self, device: torch.device, method: str, vector_bytes: float, pieces: int) -> None:
        """Learn from the measurement that just ended: ``vector_bytes`` planned besides activations."""
        if self._start is None or device.type != "cuda":
            return
        allocated, peak_before = self._start
        self._start = None
        peak = float(torch.cuda.max_memory_allocated(device))
        taken = max(0.0, (max(peak, peak_before) - allocated - vector_bytes) * pieces)
        if peak > peak_before:
            self.measured[method] = taken
        elif taken < self.activations(method):
            self.measured[method] = taken


def plan_memory(
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    k: int,
    max_basis: int,
    method: str,
    allowed: float,
    activations: float,
    basis_device: str | None = None,
    host_available: float | None = None,
    host_basis: bool = True,
) -> MemoryPlan:
    """Choose where the basis goes so the measurement fits in ``allowed`` bytes.

    Args:
        size: vector length (local shard length under FSDP).
        dtype: vector dtype.
        device: the compute device.
        k: eigenpairs wanted (the smallest basis is ``k + 2``).
        max_basis: the basis asked for.
        method: the product's method (a key of :data:`WORKING_VECTORS`).
        allowed: bytes the measurement may add on ``device``.
        activations: one product's activation bytes.
        basis_device: the user's choice (``None``: decide here).
        host_available: host bytes available (default: ``/proc/meminfo``).
        host_basis: False: only plans that keep the basis on the device (the
            caller tries a split probe first: more pieces cost little, a basis
            on the host is read over the host link at every product).
    """
    vector = float(size) * torch.finfo(dtype).bits / 8
    working = WORKING_VECTORS.get(method, 7) * vector + activations
    host = HOST_SHARE * (host_available_bytes() if host_available is None else host_available)
    cuda = device.type == "cuda"
    smallest = k + 2
    # on the device: the basis asked for, else the largest that fits (at least k + 2)
    # (an infinite allowance, Budget(max_memory=inf), has room for any basis: inf // x is NaN)
    room = int((DEVICE_FILL * allowed - working) // vector) if vector > 0 and math.isfinite(allowed) else max_basis
    fitted = max(smallest, min(max_basis, room))
    on_host = max(smallest, min(max_basis, HOST_MAX_VECTORS))
    if basis_device is not None:
        candidates = [(str(basis_device), max_basis), (str(basis_device), smallest)]
    elif cuda:
        candidates = [("cuda", max_basis), ("cuda", fitted)]
        candidates += [("cpu", on_host), ("cpu", smallest)] if host_basis else []
    else:
        candidates = [(device.type, max_basis), (device.type, smallest)]
    for where, m in candidates:
        on_device = torch.device(where).type == device.type
        device_bytes = working + (m * vector if on_device else 0.0)
        host_bytes = 0.0 if on_device else m * vector
        limit_ok = device_bytes <= DEVICE_FILL * allowed if cuda else device_bytes + host_bytes <= allowed
        if limit_ok and host_bytes <= host:
            return MemoryPlan(
                True, where, m, device_bytes, host_bytes, allowed,
                f"basis of {m} vectors on {where}: {format_bytes(device_bytes)} on {device.type}"
                f" (allowed {format_bytes(allowed)}), {format_bytes(host_bytes)} on the host",
            )
    need = working + (k + 2) * vector
    return MemoryPlan(
        False, device.type, k + 2, need, 0.0, allowed,
        f"it needs about {format_bytes(need)} ({size:,} parameters x {vector / size:.0f} bytes x "
        f"{WORKING_VECTORS.get(method, 7) + k + 2} vectors + {format_bytes(activations)} of one "
        f"product's activations) and {format_bytes(allowed)} is allowed on {device.type}; fix: "
        "a smaller probe batch, method='forward_difference', Budget(memory_ratio=...) or "
        "Budget(max_memory=<bytes>, e.g. 8 * 2**30 for 8 GiB) above that, or fewer trainable parameters",
    )


def plan_with_pieces(
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    k: int,
    max_basis: int,
    method: str,
    allowed: float,
    activations: float,
    basis_device: str | None,
    max_pieces: int,
    host_available: float | None = None,
) -> tuple[MemoryPlan, int]:
    """:func:`plan_memory` with the probe split into up to ``max_pieces`` pieces (differences).

    The first plan that fits, in this order: the basis on the device with the
    probe in 1, 2, 4, ... pieces (activations ``/ pieces``; more pieces cost
    little, the same arithmetic in smaller launches), then the same with the
    basis allowed on the host (read over the host link at every product: on
    an H200 at 355M a measurement with 6 host vectors took 703 steps where
    double backward on the device took 133). ``max_pieces=1``: never split.
    ``host_available``: as :func:`plan_memory`'s, read once for every plan tried.
    Returns the plan (the last tried when none fits) and its pieces.
    """
    if host_available is None:
        host_available = host_available_bytes()
    for host in (False, True):
        pieces = 1
        while True:
            plan = plan_memory(
                size, dtype, device, k, max_basis, method, allowed, activations / pieces, basis_device,
                host_available, host_basis=host,
            )
            if plan.fits or pieces >= max_pieces:
                break
            pieces = min(2 * pieces, max_pieces)
        if plan.fits:
            return plan, pieces
    return plan, pieces
