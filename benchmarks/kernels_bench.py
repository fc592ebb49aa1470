"""Cross-entropy curvature kernels on a GPU: eager vs torch.compile vs Triton.

Measured side by side in one run on one card:

1. the card's achieved memory bandwidth, from a large device-to-device copy
   (bytes read + bytes written over the median time);
2. for N x V logits and tangents (default 16384 x 50304, float32 and bfloat16):
   median time and peak extra memory of each backend, its error against the
   eager output, and its ratio to the bandwidth floor. The floor is the
   two-pass one: each pass reads the logits and the tangent, and the output is
   written once, ``(2 (z + u) + out) bytes / bandwidth``. (A one-pass floor,
   ``(z + u + out) / bandwidth``, is reported too: a kernel can beat the two-pass
   floor only where its second pass hits in L2.)
3. the chunked LM-head GGN product (``lm_head_ggn_product``, d = 768): peak
   extra memory and time against N, chunked and, where it fits, unchunked.

Writes ``benchmarks/results/kernels_<card>.json`` and ``.md`` (``--out`` to change
the folder). Needs CUDA; torch.compile and Triton rows need triton.

Usage::

    python benchmarks/kernels_bench.py [--n 16384] [--vocab 50304] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from curvwatch.kernels import cross_entropy_logit_hvp, triton_available
from curvwatch.operators.lm_head import lm_head_ggn_product

GiB = 2**30


def _card(name: str) -> str:
    found = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return (found.group(1) if found else re.sub(r"[^A-Za-z0-9]+", "_", name)).lower()


def _time_ms(fn, reps: int, warmup: int = 2, flush: torch.Tensor | None = None) -> dict:
    """Median/min/max of ``fn()`` in ms by CUDA events, L2 flushed before each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def _peak_extra(fn) -> tuple[int, object]:
    """Peak bytes allocated by ``fn()`` above what was allocated before (output included)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, out


def copy_bandwidth(nbytes: int = 4 * GiB, reps: int = 20) -> dict:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t = _time_ms(lambda dst=dst, src=src: dst.copy_(src), reps, warmup=3)
    del src, dst
    return {"bytes_moved": 2 * nbytes, **t, "bytes_per_s": 2 * nbytes / (t["median_ms"] * 1e-3)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_logit_hvp(n: int, vocab: int, dtype: torch.dtype, bw: float, reps: int, flush) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(n, vocab, device="cuda", generator=g) * 3).to(dtype)
    u = torch.randn(n, vocab, device="cuda", generator=g).to(dtype)
    y = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    y[::10] = -100
    elem = z.element_size()
    two_pass = (2 * (z.numel() + u.numel()) + u.numel()) * elem
    one_pass = (z.numel() + u.numel() + u.numel()) * elem
    floor_ms = two_pass / bw * 1e3
    rows = {"dtype": str(dtype).replace("torch.", ""), "N": n, "V": vocab, "bytes_two_pass": two_pass,
            "bytes_one_pass": one_pass, "floor_two_pass_ms": floor_ms, "floor_one_pass_ms": one_pass / bw * 1e3,
            "backends": {}}
    backends = ["eager"] + (["compile", "triton"] if triton_available() else [])
    ref = None
    for backend in backends:
        fn = lambda b=backend, z=z, u=u, y=y: cross_entropy_logit_hvp(z, u, y, backend=b)  # noqa: E731
        t0 = time.perf_counter()
        fn()  # compiles / autotunes
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        timing = _time_ms(fn, reps, flush=flush)
        peak, out = _peak_extra(fn)
        entry = {**timing, "first_call_s": first_s, "peak_extra_bytes": peak,
                 "peak_extra_gib": peak / GiB, "output_bytes": out.numel() * out.element_size(),
                 "fraction_of_two_pass_floor": floor_ms / timing["median_ms"],
                 "achieved_two_pass_bytes_per_s": two_pass / (timing["median_ms"] * 1e-3)}
        if ref is None:
            ref = out
        else:
            entry["rel_err_vs_eager"] = _rel(out, ref)
        rows["backends"][backend] = entry
        del out
    eager = rows["backends"]["eager"]["median_ms"]
    for entry in rows["backends"].values():
        entry["speedup_vs_eager"] = eager / entry["median_ms"]
    if "triton" in rows["backends"]:
        rows["triton_ablation"] = _triton_ablation(z, u, y, reps, flush)
    del z, u, y, ref, fn
    torch.cuda.empty_cache()
    return rows


def _triton_ablation(z, u, y, reps, flush) -> dict:
    """The autotuner's per-config times, and pass 2 in forward order vs reversed."""
    from curvwatch.kernels import mean_row_weights
    from curvwatch.kernels._triton_ce import _ce_logit_hvp_kernel, _ce_logit_hvp_tuned

    best = getattr(_ce_logit_hvp_tuned, "best_config", None)
    if best is None:  # not tuned (TRITON_INTERPRET=1)
        return {}
    timings = getattr(_ce_logit_hvp_tuned, "configs_timings", None) or {}
    configs = {f"BLOCK={c.kwargs['BLOCK']},warps={c.num_warps},stages={c.num_stages}":
               (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
    n, vocab = z.shape
    w = mean_row_weights(y, n, device=z.device)
    out = torch.empty_like(u)
    result = {"best_config": f"BLOCK={best.kwargs['BLOCK']},warps={best.num_warps},stages={best.num_stages}",
              "autotune_ms": configs}
    for reverse in (True, False):
        def run(rev=reverse):
            _ce_logit_hvp_kernel[(n,)](z, u, w, out, vocab, z.stride(0), u.stride(0), out.stride(0),
                                       BLOCK=best.kwargs["BLOCK"], REVERSE=rev,
                                       num_warps=best.num_warps, num_stages=best.num_stages)
        result["pass2_reversed" if reverse else "pass2_forward"] = _time_ms(run, reps, flush=flush)
    return result


def bench_lm_head(d: int, vocab: int, sizes: list[int], chunk: int, unchunked_max: int) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)
    W = torch.randn(vocab, d, device="cuda", generator=g) * 0.02
    dW = torch.randn(vocab, d, device="cuda", generator=g) * 0.02
    for n in sizes:
        h = torch.randn(n, d, device="cuda", generator=g)
        dh = torch.randn(n, d, device="cuda", generator=g)
        y = torch.randint(0, vocab, (n,), device="cuda", generator=g)
        for c in [chunk] + ([n] if n <= unchunked_max and n != chunk else []):
            fn = lambda c=c, h=h, dh=dh, y=y: lm_head_ggn_product(  # noqa: E731
                h, W, hidden_tangent=dh, weight_tangent=dW, targets=y, chunk_size=c)
            fn()
            timing = _time_ms(fn, reps=3, warmup=1)
            peak, out = _peak_extra(fn)
            del out
            rows.append({"N": n, "d": d, "V": vocab, "chunk_size": c, "chunked": c < n,
                         "peak_extra_bytes": peak, "peak_extra_gib": peak / GiB,
                         "one_NxV_fp32_gib": n * vocab * 4 / GiB, **timing})
        del h, dh, y, fn
        torch.cuda.empty_cache()
    return rows


def _markdown(res: dict) -> str:
    lines = [f"# Cross-entropy curvature kernels on {res['device']}", "",
             f"torch {res['torch']}, triton {res['triton']}; copy bandwidth "
             f"{res['copy']['bytes_per_s'] / 1e12:.2f} TB/s "
             f"(read + write, {res['copy']['bytes_moved'] / GiB:.0f} GiB moved, median).",
             "Floor = two passes reading logits and tangent + one output write, at the copy bandwidth.", ""]
    for r in res["logit_hvp"]:
        lines += [f"## logit HVP, N={r['N']}, V={r['V']}, {r['dtype']}: floor {r['floor_two_pass_ms']:.2f} ms "
                  f"(one-pass {r['floor_one_pass_ms']:.2f} ms)", "",
                  "| backend | median ms | x eager | % of floor | peak extra GiB | rel err vs eager |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, e in r["backends"].items():
            err = e.get("rel_err_vs_eager")
            lines.append(f"| {name} | {e['median_ms']:.2f} | {e['speedup_vs_eager']:.2f} | "
                         f"{100 * e['fraction_of_two_pass_floor']:.0f}% | {e['peak_extra_gib']:.2f} | "
                         f"{'-' if err is None else f'{err:.1e}'} |")
        if r.get("triton_ablation"):
            a = r["triton_ablation"]
            lines += ["", f"Triton config {a['best_config']}; pass 2 reversed "
                      f"{a['pass2_reversed']['median_ms']:.2f} ms vs forward {a['pass2_forward']['median_ms']:.2f} ms."]
        lines.append("")
    lines += ["## chunked LM-head GGN product (fp32, backend auto)", "",
              "| N | d | V | chunk | peak extra GiB | one N x V fp32 GiB | median ms |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["lm_head"]:
        lines.append(f"| {r['N']} | {r['d']} | {r['V']} | {r['chunk_size']}{'' if r['chunked'] else ' (unchunked)'} | "
                     f"{r['peak_extra_gib']:.2f} | {r['one_NxV_fp32_gib']:.2f} | {r['median_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--lm-sizes", default="2048,8192,32768,65536")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels_bench.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    res = {"device": name, "card": _card(name), "torch": torch.__version__, "triton": triton_version,
           "python": platform.python_version(),
           "sm_count": torch.cuda.get_device_properties(0).multi_processor_count}
    res["copy"] = copy_bandwidth()
    bw = res["copy"]["bytes_per_s"]
    print(f"{name}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    res["logit_hvp"] = []
    for dtype in (torch.float32, torch.bfloat16):
        r = bench_logit_hvp(args.n, args.vocab, dtype, bw, args.reps, flush)
        res["logit_hvp"].append(r)
        for k, e in r["backends"].items():
            print(f"{r['dtype']:>8} {k:>7}: {e['median_ms']:7.2f} ms  x{e['speedup_vs_eager']:.2f} eager  "
                  f"{100 * e['fraction_of_two_pass_floor']:5.1f}% floor  peak {e['peak_extra_gib']:.2f} GiB  "
                  f"err {e.get('rel_err_vs_eager', 0):.1e}", flush=True)
    sizes = [int(s) for s in args.lm_sizes.split(",") if s]
    res["lm_head"] = bench_lm_head(768, args.vocab, sizes, args.chunk, unchunked_max=16384)
    for r in res["lm_head"]:
        print(f"lm_head N={r['N']:6d} chunk={r['chunk_size']:6d}: peak {r['peak_extra_gib']:.2f} GiB, "
              f"{r['median_ms']:.1f} ms", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kernels_{res['card']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2))
    stem.with_suffix(".md").write_text(_markdown(res))
    print(_markdown(res))


if __name__ == "__main__":
    main()
