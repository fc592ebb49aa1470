r"""Finite-difference Hessian-vector products on the local shards of an FSDP model.

Under FSDP every rank holds a shard of every parameter and a share of the probe
batch. Double backward breaks there (FSDP's collectives are detached from
autograd, pytorch#172543), and so does even a first-order
``torch.autograd.grad(loss, params)``: the forward runs on unsharded copies and
the sharded parameters "appear to not have been used in the graph". What does
work is an ordinary ``loss.backward()``, after which FSDP leaves in each
``p.grad`` the local shard of the gradient of the *whole* probe batch (the
reduce-scatter averages the ranks' gradients; FSDP2's default divide factor is
the world size). So the Hessian is applied by central differences of two such
gradients,

.. math::

    H v \approx \frac{g(\theta + \epsilon v) - g(\theta - \epsilon v)}{2 \epsilon},
    \qquad \epsilon = h / \lVert v \rVert ,

with the step ``h`` of :func:`~curvwatch.operators.hessian.finite_difference_step`
computed from the *global* rms of the parameters and the *global* norm of ``v``.

Vectors are local shards: the flat concatenation of ``p.to_local()`` (FSDP2
DTensors) or of the local views ``p`` (FSDP1, ``use_orig_params=True``) over
the parameters. :meth:`ShardedHessianOperator.dot` all-reduces (sums) the local
inner products, so every rank sees the same ``<a, b>``; that is all Lanczos and
Hutchinson need to run in lockstep on every rank, each on its own shard of the
Krylov basis. Nothing ever gathers the full parameters or a full vector.

Random vectors: every rank draws its local shard of one *global* random
vector, defined per parameter and independent of the world size: the global
parameter (flattened row-major) is cut into chunks of :data:`CHUNK` elements,
chunk ``c`` of parameter ``i`` is drawn on the operator's device from a
generator seeded with a hash of ``(s, i, c)``, ``s`` drawn from the solver's
CPU generator (advanced identically on every rank). A rank draws only the
chunks its shard overlaps, so the cost is O(local size) and nothing crosses the
host-device link. The same seed thus gives the same global vector for any
number of ranks of one device type (and for the unsharded model through this
operator), though not the vector :meth:`CurvatureOperator.random_vector` draws
for an unsharded operator. Lanczos itself only needs consistent dot products;
the shared global vector makes results reproducible across world sizes too.

Measurements leave no trace: the local shards are perturbed in place under
``no_grad`` and restored from a saved copy (never by subtracting), so they are
bit-exact afterwards; every ``.grad`` (and FSDP1's flat-parameter ``.grad``) is
stashed before each backward and put back afterwards, the same tensor objects,
``None`` included; FSDP modules are resharded after each gradient so no
perturbed unsharded copy outlives a product.

Supported layouts: FSDP2 (``fully_shard``; also HSDP, a mesh replicated over
some dimensions and sharded over the others: every dot product is divided by
the replication factor), FSDP1 with ``use_orig_params=True`` (the local views
of the original parameters, including empty ones) or with flat parameters,
sharding strategies ``FULL_SHARD`` and ``SHARD_GRAD_OP``. All checked on the CPU
with gloo and two processes (tests/operators/test_distributed.py).

Limitations: gradient sync must be on (``set_requires_gradient_sync(True)``,
the default); ranks' shares of the probe batch must be of equal size (FSDP
averages per-rank mean losses); under a mixed-precision policy whose
``param_dtype`` is lower than the parameters' dtype the step is chosen for the
compute dtype, but per-element perturbations below the compute dtype's
resolution are lost, so results in bf16 are coarse (a warning says so).
DeepSpeed ZeRO-3 is rejected (:func:`check_supported`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from curvwatch._errors import CurvatureError, CurvatureWarning
from curvwatch._flat import flatten, local
from curvwatch.operators._base import CurvatureOperator
from curvwatch.operators._closure import Closure, check_params, checked_loss
from curvwatch.operators._difference import difference_product
from curvwatch.operators.hessian import finite_difference_step

# Elements per independently seeded chunk of a parameter's global random vector.
CHUNK = 1 << 18

DEEPSPEED_ZERO3_MSG = (
    "DeepSpeed ZeRO stage 3 is not supported: it partitions parameters outside "
    "autograd and gathers them in hooks (parameters carry ds_id/ds_status), so "
    "curvwatch can neither take gradients with respect to them nor perturb their "
    "shards consistently. Use ZeRO stage 1 or 2 (full parameters on every rank, "
    "measure with reduce=all_reduce_mean), or PyTorch FSDP (fully_shard, or "
    "FullyShardedDataParallel(use_orig_params=True)), which curvwatch measures "
    "with finite differences on the local shards"
)

_MASK64 = (1 << 64) - 1


def check_supported(model: torch.nn.Module) -> None:
    """Raise for sharded setups curvwatch cannot measure (DeepSpeed ZeRO-3).

    Raises:
        CurvatureError: a parameter carries DeepSpeed ZeRO-3's ``ds_id`` or
            ``ds_status`` attribute.
    """
    if any(hasattr(p, "ds_id") or hasattr(p, "ds_status") for p in model.parameters()):
        raise CurvatureError(DEEPSPEED_ZERO3_MSG)


def is_sharded(model: torch.nn.Module) -> bool:
    """True for FSDP-wrapped models (FSDP1 wrappers or FSDP2 DTensor parameters)."""
    if any(type(m).__name__ in ("FullyShardedDataParallel", "FSDPModule") for m in model.modules()):
        return True
    return any(type(p).__name__ == "DTensor" or hasattr(p, "device_mesh") for p in model.parameters())


@dataclass(frozen=True)
class _Layout:
    """Where a parameter's local shard sits in the global parameter.

    The local tensor is the box ``global[offset[d] : offset[d] + shape[d]]`` of a
    tensor of shape ``global_shape`` (FSDP1 pieces: 1-D boxes of the flattened
    parameter).
    """

    global_shape: tuple[int, ...]
    shape: tuple[int, ...]
    offset: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)


class ShardedHessianOperator(CurvatureOperator):
    """Finite-difference Hessian products on the local shards of an FSDP model.

    ``size`` is this rank's local length; all ranks must call :meth:`matvec`,
    :meth:`dot` and :meth:`random_vector` in the same order (as every solver in
    :mod:`curvwatch.solvers` does), since each of them communicates.

    Args:
        closure: ``closure() -> loss`` on this rank's share of the probe batch,
            computed through the FSDP-wrapped model (mean-reduced; equal shares
            on every rank).
        params: the trainable parameters (FSDP2 DTensors, FSDP1
            ``use_orig_params=True`` views, or FSDP1 flat parameters), in the
            same order on every rank.
        module: the FSDP-wrapped root module (for resharding and for FSDP1's
            flat-parameter gradients).
        scheme: ``"central"`` (default; two gradients per product, O(h^2)) or
            ``"forward"`` (one gradient against the cached gradient at theta).
        step: the parameter-space step ``|eps v|``; default
            :func:`~curvwatch.operators.hessian.finite_difference_step` of the
            global parameter rms, in the compute dtype.

    Attributes:
        loss: mean over ranks of the probe loss at ``theta`` (``None`` until
            computed: forward scheme or :meth:`gradient_at_theta`).
        gradient: local shard of the probe gradient at ``theta`` (same).

    Raises:
        CurvatureError: bad parameters; a model mixing sharded and unsharded
            trainable parameters, or replicated parameters across processes;
            DeepSpeed ZeRO-3; an FSDP1 sharding strategy other than full or
            grad-op sharding.

    Example::

        fully_shard(model)   # every rank, probe batch split over ranks
        op = ShardedHessianOperator(lambda: criterion(model(x_local), y_local),
                                    [p for p in model.parameters() if p.requires_grad],
                                    module=model)
        top = curvwatch.lanczos(op, k=2)      # same eigenvalues on every rank
    """

    forms_gradient = True
    scales_step = True

    def __init__(
        self,
        closure: Closure,
        params: Iterable[torch.Tensor],
        module: torch.nn.Module,
        scheme: Literal["central", "forward"] = "central",
        step: float | None = None,
    ) -> None:
        if scheme not in ("central", "forward"):
            raise CurvatureError(f"unknown scheme {scheme!r}; choose 'central' or 'forward'")
        if not callable(closure):
            raise CurvatureError("closure must be callable: closure() -> scalar loss")
        if not isinstance(module, torch.nn.Module):
            raise CurvatureError(f"module must be the FSDP-wrapped nn.Module, got {type(module).__name__}")
        check_supported(module)
        self.params = check_params(params)
        self.module = module
        self.closure = closure
        self.scheme = scheme
        self.step = step
        self.step_scale = 1.0  # multiplies the step (a Richardson certificate halves it)
        self._world = _world_size()
        self._layouts, self._replicas = _layouts(self.params, module, self._world)
        self._fsdp2 = [m for m in module.modules() if _is_fsdp2(m)]
        self._flat_params = _fsdp1_flat_params(module)
        self._compute_dtype = _compute_dtype(module, self.params[0].dtype)
        with torch.no_grad():
            first = local(self.params[0])
        super().__init__(sum(lay.numel for lay in self._layouts), self.params[0].dtype, first.device)
        self.global_size = sum(lay.global_numel for lay in self._layouts)
        self.loss: float | None = None
        self.gradient: torch.Tensor | None = None
        self._rms: float | None = None

    # -- communication ---------------------------------------------------------
    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if self._replicas > 1:
            tensor.div_(self._replicas)
        return tensor

    def mean_over_ranks(self, value: float) -> float:
        """The mean of a per-process scalar over all ranks (a float64 all-reduce)."""
        if self._world == 1:
            return value
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.item() / self._world

    def any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is true on any rank (an all-reduced sum)."""
        flag_tensor = torch.tensor([1.0 if flag else 0.0], dtype=torch.float32, device=self.device)
        return self._all_reduce_sum(flag_tensor).item() > 0

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Global inner product: local ``<a, b>`` summed over ranks (0-d tensor)."""
        return self._all_reduce_sum(torch.dot(a, b).reshape(1)).reshape(())

    def random_vector(self, generator: torch.Generator, kind: str = "normal") -> torch.Tensor:
        """This rank's shard of one global random vector (see the module doc)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        parts = [
            _draw_shard(lay, seed, i, kind, self.device, self.dtype) for i, lay in enumerate(self._layouts)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype, device=self.device)

    # -- gradients ----------------------------------------------------------------
    def _local_params(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [local(p) for p in self.params]

    def _gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Local shard of the probe gradient at the current parameters, and the loss.

        The user's ``.grad`` tensors are stashed and put back (same objects).
        """
        owners = [p for p in self.module.parameters() if p.requires_grad]
        stash = [(p, p.grad) for p in owners] + [(fp, fp.grad) for fp in self._flat_params]
        try:
            for p, _ in stash:
                p.grad = None
            with torch.enable_grad():
                loss = checked_loss(self.closure)
                loss.backward()
            with torch.no_grad():
                grads = [
                    torch.zeros_like(lp) if p.grad is None else local(p.grad).reshape(lp.shape)
                    for p, lp in zip(self.params, self._local_params())
                ]
                flat = flatten(grads) if grads else torch.zeros(0, dtype=self.dtype, device=self.device)
        finally:
            for p, g in stash:
                p.grad = g
            self._reshard()
        return flat, loss.detach()

    def _reshard(self) -> None:
        for m in self._fsdp2:
            m.reshard()

    def _mean_loss(self, loss: torch.Tensor) -> float:
        total = loss.detach().to(torch.float64).reshape(1).clone()
        if self._world > 1:
            import torch.distributed as dist

            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            total.div_(self._world)
        return total.item()

    def gradient_at_theta(self, keep: bool = True) -> torch.Tensor:
        """Local shard of the probe gradient at the current parameters (cached).

        ``keep=False``: not cached where central differences do not hold it anyway.
        """
        if self.gradient is None:
            g, loss = self._gradient()
            self.loss = self._mean_loss(loss)
            if not keep and self.scheme != "forward":
                return g
            self.gradient = g
        return self.gradient

    # -- products -------------------------------------------------------------------
    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        vnorm = self.norm(v).item()
        if vnorm == 0.0:
            return torch.zeros_like(v)
        if self.scheme == "forward":
            self.gradient_at_theta()
        local = self._local_params()
        if self._rms is None:  # theta is the same for every product of this operator
            squares = torch.zeros(1, dtype=torch.float64, device=self.device)
            with torch.no_grad():
                for t in local:
                    squares += t.to(torch.float64).pow(2).sum()
            self._rms = math.sqrt(self._all_reduce_sum(squares).item() / max(self.global_size, 1))
        h = self.step if self.step is not None else finite_difference_step(self._compute_dtype, self._rms, self.scheme)
        h *= self.step_scale
        return difference_product(
            local, v, h, vnorm, lambda out, weight: out.add_(self._gradient()[0], alpha=weight), self.scheme,
            self.gradient,
        )

    def release(self) -> None:
        """Nothing to free: finite differences keep no graph."""


# -- layouts of the local shards ------------------------------------------------------
def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_fsdp2(module: torch.nn.Module) -> bool:
    return any(cls.__name__ == "FSDPModule" for cls in type(module).__mro__) and callable(
        getattr(module, "reshard", None)
    )


def _fsdp1_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if type(m).__name__ == "FullyShardedDataParallel"]


def _fsdp1_flat_params(module: torch.nn.Module) -> list[torch.Tensor]:
    out = []
    for unit in _fsdp1_units(module):
        handle = getattr(unit, "_handle", None)
        if handle is not None and getattr(handle, "flat_param", None) is not None:
            out.append(handle.flat_param)
    return out


def _layouts(params: Sequence[torch.Tensor], module: torch.nn.Module, world: int):
    """Per-parameter :class:`_Layout` and the replication factor of the shards."""
    dtensors = [type(p).__name__ == "DTensor" for p in params]
    if any(dtensors) and not all(dtensors):
        raise CurvatureError(
            f"{dtensors.count(False)} of {len(params)} trainable parameters are not "
            "sharded (not DTensors) while the others are: apply fully_shard to the root "
            "module too, so every parameter is managed by FSDP"
        )
    if all(dtensors):
        return _dtensor_layouts(params, world)
    units = _fsdp1_units(module)
    if units:
        return _fsdp1_layouts(params, units, world), 1
    if world > 1:
        raise CurvatureError(
            "the parameters are not sharded (no FSDP) but there are several processes: "
            "for replicated models (DDP) use HessianOperator wrapped in "
            "ReducedOperator, i.e. CurvatureMonitor(..., reduce=all_reduce_mean)"
        )
    return [_Layout(tuple(p.shape), tuple(p.shape), (0,) * p.dim()) for p in params], 1


def _dtensor_layouts(params: Sequence[torch.Tensor], world: int):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    layouts, replicas = [], set()
    for p in params:
        mesh, placements = p.device_mesh, p.placements
        if mesh.size() != world:
            raise CurvatureError(
                f"a parameter lives on a device mesh of {mesh.size()} ranks, the world has "
                f"{world}: curvwatch all-reduces over the whole world, so shard over all ranks"
            )
        for placement in placements:
            if not isinstance(placement, (Shard, Replicate)):
                raise CurvatureError(f"unsupported DTensor placement {placement} (Shard or Replicate only)")
        replicas.add(math.prod(mesh.size(d) for d, pl in enumerate(placements) if isinstance(pl, Replicate)))
        shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
        with torch.no_grad():
            local_shape = tuple(p.to_local().shape)
        if tuple(shape) != local_shape:
            raise CurvatureError(
                f"local shard has shape {local_shape}, expected {tuple(shape)} from the "
                "DTensor's placements"
            )
        layouts.append(_Layout(tuple(p.shape), local_shape, tuple(offset)))
    if len(replicas) > 1:
        raise CurvatureError(f"parameters are replicated unevenly ({sorted(replicas)}): use one device mesh")
    return layouts, replicas.pop()


def _fsdp1_layouts(params: Sequence[torch.Tensor], units, world: int) -> list[_Layout]:
    info: dict[int, _Layout] = {}
    for unit in units:
        strategy = getattr(getattr(unit, "sharding_strategy", None), "name", "FULL_SHARD")
        if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
            raise CurvatureError(
                f"FSDP sharding_strategy={strategy} is not supported: use FULL_SHARD or "
                "SHARD_GRAD_OP (or fully_shard)"
            )
        handle = getattr(unit, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is None:
            continue
        n_local = flat.numel()
        rank = _rank()
        info[id(flat)] = _Layout((n_local * world,), (n_local,), (rank * n_local,))
        originals = getattr(flat, "_params", None) or []
        for p, shape, shard in zip(originals, flat._shapes, flat._shard_param_infos):
            numel = math.prod(shape)
            if shard.in_shard:
                info[id(p)] = _Layout((numel,), (shard.numel_in_shard,), (shard.intra_param_start_idx,))
            else:
                info[id(p)] = _Layout((numel,), (0,), (0,))
    layouts = []
    for i, p in enumerate(params):
        layout = info.get(id(p))
        if layout is None or layout.numel != p.numel():
            raise CurvatureError(
                f"parameter #{i} (shape {tuple(p.shape)}) is not managed by an FSDP unit of "
                "the model: wrap the root module with FullyShardedDataParallel"
            )
        layouts.append(layout)
    return layouts


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _compute_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The lowest-precision dtype FSDP computes in (mixed-precision policies)."""
    found = []
    for m in module.modules():
        state = getattr(m, "_get_fsdp_state", None)
        if callable(state):
            policy = getattr(state(), "_mp_policy", None)
            found.append(getattr(policy, "param_dtype", None))
        if type(m).__name__ == "FullyShardedDataParallel":
            found.append(getattr(getattr(m, "mixed_precision", None), "param_dtype", None))
    lower = [d for d in found if d is not None and torch.finfo(d).eps > torch.finfo(dtype).eps]
    if not lower:
        return dtype
    worst = max(lower, key=lambda d: torch.finfo(d).eps)
    warnings.warn(
        f"curvwatch: FSDP computes in {worst} (mixed-precision param_dtype) while the "
        f"parameters are {dtype}: finite differences lose perturbations below {worst}'s "
        "resolution, so curvature is coarse; measure with param_dtype=None for accuracy",
        CurvatureWarning,
        stacklevel=3,
    )
    return worst


# -- the shared global random vector -----------------------------------------------------
def _mix(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 finalizer), the same in every process."""
    h = 0x9E3779B97F4A7C15
    for value in values:
        h = (h ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1


def _draw_chunk(seed: int, index: int, chunk: int, length: int, kind: str, device, dtype) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(_mix(seed, index, chunk))
    if kind == "rademacher":
        bits = torch.randint(0, 2, (length,), generator=generator, device=device, dtype=dtype)
        return bits.mul_(2).sub_(1)
    return torch.randn(length, generator=generator, device=device, dtype=dtype)


def _draw_shard(layout: _Layout, seed: int, index: int, kind: str, device, dtype) -> torch.Tensor:
    """The local box of parameter ``index``'s global random vector, flattened."""
    if layout.numel == 0:
        return torch.zeros(0, dtype=dtype, device=device)
    strides = [math.prod(layout.global_shape[d + 1 :]) for d in range(len(layout.global_shape))]
    lo = sum(o * s for o, s in zip(layout.offset, strides))
    hi = sum((o + n - 1) * s for o, n, s in zip(layout.offset, layout.shape, strides))
    total = layout.global_numel
    pieces = []
    for c in range(lo // CHUNK, hi // CHUNK + 1):
        start = c * CHUNK
        values = _draw_chunk(seed, index, c, min(CHUNK, total - start), kind, device, dtype)
        pieces.append(values[max(lo - start, 0) : hi + 1 - start])
    segment = torch.cat(pieces)
    return segment.as_strided(layout.shape, strides, 0).reshape(-1)
