"""The peers on the same model, batch and accuracy target: hessian-eigenthings
(``pip install hessian-eigenthings``) and PyHessian (``pip install pyhessian``).

Both run through the plain APIs they document, on :class:`~benchmarks.models.CausalLM`
(``model(inputs) -> logits``) with ``criterion(logits, targets)``, inside
curvwatch's measurement guard (eval mode, math attention: their double
backward needs it too). A package that is not installed is recorded and skipped.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from benchmarks.hvp import ACCURACY, _err, probe_vector
from benchmarks.models import lm_criterion, loss_fn
from benchmarks.timing import Meter
from curvwatch.guard import measurement_guard


def _missing(name: str, error: Exception) -> dict[str, Any]:
    return {"available": False, "reason": f"{name} not importable ({type(error).__name__}: {error})"}


def _counting(fn, counter: list[int]):
    def wrapped(*args, **kwargs):
        counter[0] += 1
        return fn(*args, **kwargs)
    return wrapped


def _top_ritz_values(alphas: torch.Tensor, betas: torch.Tensor) -> list[float]:
    """Largest eigenvalue of each leading m x m block of the Lanczos tridiagonal."""
    a, b = alphas.double().cpu(), betas.double().cpu()
    tops = []
    for m in range(1, len(a) + 1):
        t = torch.diag(a[:m])
        if m > 1:
            t += torch.diag(b[: m - 1], 1) + torch.diag(b[: m - 1], -1)
        tops.append(float(torch.linalg.eigvalsh(t)[-1]))
    return tops


def eigenthings(model, batch, meter: Meter, ref: float, max_iter: int, samples: int, reps: int) -> dict[str, Any]:
    """hessian-eigenthings: HVP cost, Lanczos to 1%, Hutchinson samples."""
    try:
        import hessian_eigenthings as he
    except ImportError as error:
        return _missing("hessian_eigenthings", error)
    out: dict[str, Any] = {
        "available": True, "version": he.__version__, "hvp_method": "autograd (new graph per product)"
    }
    count = [0]
    with measurement_guard(model):
        op = he.HessianOperator(model, [batch], loss_fn, method="autograd")
        op.matvec = _counting(op.matvec, count)
        v = probe_vector(model)
        out["hvp"] = meter.time(lambda: op.matvec(v), reps, warmup=1).as_dict()
        # One long run of their Lanczos kernel: the top Ritz value after m steps
        # is what lanczos(max_iter=m) returns from the same start vector.
        v0 = torch.randn(op.size, dtype=op.dtype, generator=torch.Generator().manual_seed(0)).to(op.device)
        td = he.lanczos_tridiagonal(op, v0, max_iter)
        errors = [_err(t, ref) for t in _top_ritz_values(td.alphas, td.betas)]
        needed = next((m for m, e in enumerate(errors, 1) if e <= ACCURACY), None)
        out["lanczos_trajectory_rel_error"] = errors
        out["iterations_to_1pct"] = needed
        m = needed or max_iter
        count[0] = 0
        seconds, result = meter.once(lambda: he.lanczos(op, k=1, max_iter=m, tol=ACCURACY, which="LA", seed=0))
        out["lanczos"] = {
            "max_iter": m, "matvecs": count[0], "lambda_max": float(result.eigenvalues[0]),
            "rel_error": _err(float(result.eigenvalues[0]), ref), "converged": bool(result.converged[0]),
            "seconds": seconds,
        }
        count[0] = 0
        seconds, trace = meter.once(lambda: he.hutchinson(op, num_samples=samples, seed=0))
        out["hutchinson"] = {
            "samples": samples, "matvecs": count[0], "seconds_per_sample": seconds / samples,
            "trace_estimate": trace.estimate,
        }
    return out


def _pyhessian_stop(values: list[float], tol: float) -> int:
    """Iterations PyHessian's power iteration runs with ``tol`` (its stopping rule)."""
    for i in range(1, len(values)):
        if abs(values[i - 1] - values[i]) / (abs(values[i - 1]) + 1e-6) < tol:
            return i + 1
    return len(values)


def pyhessian(model, batch, meter: Meter, ref: float, max_iter: int, samples: int) -> dict[str, Any]:
    """PyHessian: power iteration (its stopping rule at 1e-2 and 1e-3), Hutchinson."""
    try:
        from pyhessian import hessian as Hessian

        module = sys.modules["pyhessian.hessian"]  # the package re-exports the class under this name
    except ImportError as error:
        return _missing("pyhessian", error)
    out: dict[str, Any] = {"available": True, "hvp_method": "double backward, graph kept in .grad"}
    original = module.hessian_vector_product
    record: list[torch.Tensor] = []

    def recording(gradsH, params, v):
        hv = original(gradsH, params, v)
        record.append(sum((a * b).sum() for a, b in zip(hv, v)).detach())  # v is unit: Rayleigh quotient
        return hv

    model.zero_grad(set_to_none=True)
    module.hessian_vector_product = recording
    try:
        with measurement_guard(model):
            out["setup_s"], h = meter.once(lambda: Hessian(model, lm_criterion, data=batch, cuda=meter.cuda))
            # Full run without its stopping rule: the estimate after each iteration.
            seconds, _ = meter.once(lambda h=h: h.eigenvalues(maxIter=max_iter, tol=0.0))
            values = [float(t) for t in record]
            out["seconds_per_iteration"] = seconds / max(len(values), 1)
            errors = [_err(x, ref) for x in values]
            out["power_trajectory_rel_error"] = errors
            out["iterations_to_1pct"] = next((i for i, e in enumerate(errors, 1) if e <= ACCURACY), None)
            out["max_iter"] = max_iter
            for tol in (1e-3,):
                n = _pyhessian_stop(values, tol)
                out[f"stop_tol_{tol:g}"] = {"iterations": n, "rel_error": errors[n - 1], "capped": n == max_iter}
            # Its own run at the 1% target (tol=1e-2), timed.
            record.clear()
            seconds, (eigenvalues, _) = meter.once(lambda h=h: h.eigenvalues(maxIter=max_iter, tol=ACCURACY))
            out["power_tol_0.01"] = {
                "iterations": len(record), "lambda_max": float(eigenvalues[0]),
                "rel_error": _err(float(eigenvalues[0]), ref), "seconds": seconds,
            }
            record.clear()
            seconds, trace_samples = meter.once(lambda h=h: h.trace(maxIter=samples, tol=0.0))
            out["hutchinson"] = {
                "samples": len(trace_samples), "matvecs": len(record),
                "seconds_per_sample": seconds / max(len(trace_samples), 1),
                "trace_estimate": float(sum(trace_samples) / len(trace_samples)),
            }
            del h
    finally:
        module.hessian_vector_product = original
        model.zero_grad(set_to_none=True)  # PyHessian leaves a graph in .grad
    return out


def memory(model, batch, meter: Meter, state_bytes: int) -> dict[str, float]:
    """Peak bytes of two products of each peer (set-up included)."""
    v = probe_vector(model)
    out: dict[str, float] = {}
    try:
        import hessian_eigenthings as he

        def eig():
            with measurement_guard(model):
                op = he.HessianOperator(model, [batch], loss_fn, method="autograd")
                op.matvec(v)
                op.matvec(v)
        out["hessian-eigenthings"] = meter.peak(eig, state_bytes)
    except ImportError:
        pass
    try:
        from pyhessian import hessian as Hessian
        from pyhessian.utils import hessian_vector_product

        def pyh():
            with measurement_guard(model):
                h = Hessian(model, lm_criterion, data=batch, cuda=meter.cuda)
                vs = list(v.split([p.numel() for p in h.params]))
                vs = [t.view_as(p) for t, p in zip(vs, h.params)]
                hessian_vector_product(h.gradsH, h.params, vs)
                hessian_vector_product(h.gradsH, h.params, vs)
                del h
            model.zero_grad(set_to_none=True)
        out["PyHessian"] = meter.peak(pyh, state_bytes)
    except ImportError:
        pass
    model.zero_grad(set_to_none=True)
    return {k: (x if x == x else math.nan) for k, x in out.items()}
