"""One-off diagnostic behind the notes of results/gpu_h100.md (not part of run.py).

On the benchmark's model after its warm-up steps: lambda_max error of a
30-product Lanczos with finite differences against double backward, for steps
0.1x-100x the default, in float32 and (at the default steps) float64; the cost
of ``CurvatureOperator.random_vector`` against ``torch.randn`` on the device;
lambda_max over the next three AdamW steps. ``DEV=cpu`` runs it on the tiny
CPU model. Usage: ``python benchmarks/fd_step_check.py``.
"""
import copy
import os
import sys

sys.path.insert(0, '.')

import torch

from benchmarks import hvp, models
from benchmarks.timing import Meter
from curvwatch import HessianOperator, lanczos
from curvwatch.guard import measurement_guard
from curvwatch.operators.hessian import finite_difference_step

dev = torch.device(os.environ.get("DEV", "cuda"))
s = models.GPU if dev.type == "cuda" else models.CPU
meter = Meter(dev)
model = models.build_model(s, dev)
opt = models.make_optimizer(model, s)
b = models.bigram_batches(s, 64, dev, 1)
probe = models.bigram_batches(s, 1, dev, 2)[0]
for i in range(s.warmup_steps):
    models.train_step(model, opt, b[i % 64])


def lam(m, **kw):
    ps = [p for p in m.parameters()]
    with measurement_guard(m):
        op = HessianOperator(lambda: models.loss_fn(m, probe), ps, **kw)
        t, r = meter.once(lambda: lanczos(op, k=1, tol=1e-12, max_matvecs=30, seed=0))
    return r.lambda_max, t


ps = [p for p in model.parameters()]
n = sum(p.numel() for p in ps)
rms = float(torch.cat([p.detach().flatten() for p in ps]).pow(2).mean().sqrt())
with torch.no_grad():
    max_theta = max(float(p.abs().max()) for p in ps)
    print("loss", float(models.loss_fn(model, probe)), "n", n, "rms", rms, "max|theta|", max_theta)
ref = hvp.reference(model, probe, 1e-6, 80)
R = ref["lambda_max"]
print("ref fp32 double backward", ref)
for scheme in ("central", "forward"):
    h0 = finite_difference_step(torch.float32, rms, scheme)
    for f in (0.1, 1.0, 10.0, 100.0):
        l, t = lam(model, method="finite_difference", scheme=scheme, step=h0 * f)
        print(f"fp32 {scheme} h={h0*f:.2e} lambda={l:.6g} rel.err={abs(l-R)/R:.2e} ({t:.1f}s)", flush=True)
m64 = copy.deepcopy(model).double()
ref64 = hvp.reference(m64, probe, 1e-8, 60)
print("ref fp64 double backward", ref64)
R64 = ref64["lambda_max"]
for scheme in ("central", "forward"):
    h = finite_difference_step(torch.float32, rms, scheme)
    l, t = lam(m64, method="finite_difference", scheme=scheme, step=h)
    print(
        f"fp64 {scheme} h={h:.2e} (the fp32 default) lambda={l:.6g} rel.err={abs(l-R64)/R64:.2e} ({t:.1f}s)",
        flush=True,
    )
del m64
op = HessianOperator(lambda: models.loss_fn(model, probe), ps)
g = torch.Generator().manual_seed(0)
for kind in ("normal", "rademacher"):
    st = meter.time(lambda kind=kind: op.random_vector(g, kind), 3, warmup=1)
    print(f"random_vector({kind}) n={n}: {st.median:.3f} s")
st = meter.time(lambda: torch.randn(n, device=dev), 3, warmup=1)
print(f"torch.randn on the GPU: {st.median*1e3:.2f} ms")
step = meter.time(lambda: models.train_step(model, opt, b[0]), 5, warmup=1)
print(f"train step {step.median*1e3:.1f} ms")
for i in range(3):
    models.train_step(model, opt, b[i])
    r = hvp.reference(model, probe, 1e-5, 60)
    with torch.no_grad():
        print("after one more step: lambda", r["lambda_max"], "loss", float(models.loss_fn(model, probe)), flush=True)
