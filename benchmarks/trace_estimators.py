"""Trace estimators at equal products: Hutchinson, Lanczos-deflated Hutchinson (curvwatch's), Hutch++.

The Hessian of a small MLP trained briefly on scikit-learn's digits (shipped
with the package, no download) is formed densely, so its trace is exact. For
each budget of ``m`` products, over ``--seeds`` seeds:

* ``hutchinson``: ``m`` Rademacher probes;
* ``deflated``: what a monitor measurement does: the top-``k`` Ritz vectors of
  the eigenvalue solve it ran anyway (their products not counted, ``free``) and
  ``m`` probes of the deflated remainder; also charged for its Lanczos
  products (``deflated, charged``: ``m`` in all);
* ``hutch++``: Meyer et al. (2021): ``m/3`` products for the sketch ``A S``,
  ``m/3`` for ``Q^T A Q``, ``m/3`` probes of the remainder; it keeps ``2 m / 3``
  parameter-sized vectors at once.

Prints the root-mean-square relative error of each. CPU, one thread::

    python benchmarks/trace_estimators.py --seeds 40
"""

from __future__ import annotations

import argparse
import math

import torch


def hessian_of_digits_mlp(hidden: int = 24) -> torch.Tensor:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:512], dtype=torch.float64) / 16
    y = torch.tensor(digits.target[:512])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = math.prod(shape)
            params[name] = theta[offset : offset + size].reshape(shape)
            offset += size
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.func.hessian(loss)(flat)


def rademacher(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n, count), generator=generator, dtype=torch.float64).mul_(2).sub_(1)


def hutchinson(a: torch.Tensor, m: int, g: torch.Generator) -> float:
    z = rademacher(a.shape[0], m, g)
    return float((z * (a @ z)).sum() / m)


def deflated(a: torch.Tensor, m: int, k: int, lanczos_products: int, g: torch.Generator) -> tuple[float, int]:
    import curvwatch as cw

    seed = int(torch.randint(0, 2**31, (1,), generator=g))
    eig = cw.lanczos(cw.DenseOperator(a), k=k, max_matvecs=lanczos_products, seed=seed)
    est = cw.hutchinson(cw.DenseOperator(a), max(1, m), seed=seed + 1, deflation=eig)
    return est.estimate, eig.matvecs


def hutch_pp(a: torch.Tensor, m: int, g: torch.Generator) -> float:
    n, third = a.shape[0], max(1, m // 3)
    s = rademacher(n, third, g)
    q, _ = torch.linalg.qr(a @ s)
    low_rank = float(torch.trace(q.T @ (a @ q)))
    probes = max(1, m - 2 * third)
    z = rademacher(n, probes, g)
    z = z - q @ (q.T @ z)
    return low_rank + float((z * (a @ z)).sum() / probes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--budgets", default="10,20,40")
    parser.add_argument("--k", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    a = hessian_of_digits_mlp()
    exact = float(torch.trace(a))
    eigenvalues = torch.linalg.eigvalsh(a)
    print(f"Hessian {a.shape[0]} x {a.shape[0]}, trace {exact:.4f}, lambda_max {eigenvalues[-1]:.4f}, "
          f"top-2 share of the trace {float(eigenvalues[-2:].sum()) / exact:.2f}")
    print("products | hutchinson | deflated (free Ritz) | deflated, charged | hutch++  (RMS relative error)")
    for m in (int(b) for b in args.budgets.split(",")):
        errors: dict[str, list[float]] = {"h": [], "d": [], "dc": [], "pp": []}
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            errors["h"].append(hutchinson(a, m, g) / exact - 1)
            value, _ = deflated(a, m, args.k, 30, g)
            errors["d"].append(value / exact - 1)
            charged = max(args.k + 1, m // 2)
            value, spent = deflated(a, m - charged, args.k, charged, g)
            errors["dc"].append(value / exact - 1)
            errors["pp"].append(hutch_pp(a, m, g) / exact - 1)
        rms = {key: math.sqrt(sum(e * e for e in v) / len(v)) for key, v in errors.items()}
        print(f"{m:8d} | {rms['h']:10.4f} | {rms['d']:20.4f} | {rms['dc']:17.4f} | {rms['pp']:8.4f}")


if __name__ == "__main__":
    main()
