"""The markdown table of a benchmark run (every figure a ratio to the step)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from benchmarks.timing import GiB

GOALS = "issue 6 / docs/design.md 'Performance targets'"
# The row of the product table that each monitor method uses.
MONITOR_ROW = {
    "forward_difference": "finite_difference forward",
    "double_backward": "double_backward, graph reused",
    "finite_difference": "finite_difference central",
    "forward_over_reverse": "forward_over_reverse",
}


def default_row(r: dict[str, Any]) -> tuple[str, str]:
    """(monitor method, product-table row) of what ``method='auto'`` ran in this run."""
    runs = r.get("monitor", {}).get("monitored_runs", [])
    method = runs[-1]["measurements"][0]["method"] if runs and runs[-1]["measurements"] else "double_backward"
    return method, MONITOR_ROW.get(method, "double_backward, graph reused")


def _x(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}x"


def _e(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.1e}"


def markdown(r: dict[str, Any]) -> str:
    s, m = r["setup"], r["machine"]
    step = r["step"]["median"]
    mem = r.get("memory", {})
    step_mem = mem.get("step", math.nan)
    commit = f", curvwatch {r['commit']}" if r.get("commit") else ""
    where = m.get("card", f"CPU ({m.get('cpu', '?')}), {m['cpu_count']} cores, torch threads {m['torch_threads']}")
    lines = [
        f"# curvwatch benchmark: {s['name']} on {where}",
        "",
        f"{r['parameters']:,} parameters ({s['n_layer']} layers x {s['n_embd']}, {s['n_head']} heads, vocab "
        f"{s['vocab']}), batch {s['batch']} x {s['seq']} tokens, fp32, dropout off, AdamW. torch {m['torch']}, "
        f"transformers {m.get('transformers', '?')}{commit}. One process; every figure below is a multiple of the "
        f"training step measured in the same run: forward + backward + AdamW step = "
        f"{step * 1e3:.1f} ms (median of {r['step']['reps']}, spread {r['step']['spread']:.0%}), peak memory "
        f"{step_mem / GiB:.3f} GiB ({mem.get('method', '?')}). Whole run {r.get('wall_s', 0):.0f} s.",
        "",
        "## One Hessian-vector product",
        "",
        "| method | time (x step) | min/min | spread | first product (x step) | peak memory (x step) | "
        "lambda_max rel. error, Lanczos of up to 30 products (tol 1e-12) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ref = r["reference"]
    auto, default = default_row(r)
    for name, row in r["products"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:80]} | | | | | |")
            continue
        acc = r["lanczos_30"].get(name, {})
        local = row.get("step_local") or r["step"]
        peak = mem.get("curvwatch", {}).get(name, math.nan)
        mark = f" (method='auto' = {auto})" if name == default else ""
        lines.append(
            f"| curvwatch {name}{mark} | {_x(row['steady']['median'] / local['median'])} | "
            f"{_x(row['steady']['min'] / local['min'])} | {row['steady']['spread']:.0%} | "
            f"{_x(row['first_s'] / step)} | {_x(peak / step_mem)} | {_e(acc.get('rel_error'))} |"
        )
    eig, pyh = r.get("eigenthings", {}), r.get("pyhessian", {})
    if eig.get("available"):
        traj = eig["lanczos_trajectory_rel_error"]
        lines.append(
            f"| hessian-eigenthings {eig['version']} ({eig['hvp_method']}) | {_x(eig['hvp']['median'] / step)} | "
            f"{_x(eig['hvp']['min'] / r['step']['min'])} | {eig['hvp']['spread']:.0%} | - | "
            f"{_x(mem.get('peers', {}).get('hessian-eigenthings', math.nan) / step_mem)} | "
            f"{_e(traj[min(29, len(traj) - 1)])} |"
        )
    if pyh.get("available"):
        lines.append(
            f"| PyHessian ({pyh['hvp_method']}) | {_x(pyh['seconds_per_iteration'] / step)} | - | - | "
            f"{_x(pyh['setup_s'] / step)} (set-up) | "
            f"{_x(mem.get('peers', {}).get('PyHessian', math.nan) / step_mem)} | "
            "(power iteration, below) |"
        )
    lines += [
        "",
        f"Reference lambda_max = {ref['lambda_max']:.6g}: {ref['dtype']} double-backward Lanczos, "
        f"{ref['matvecs']} products, relative residual {ref['relative_residual']:.1e}. "
        "Time: median of the later products of one measurement over the median of training steps timed right "
        "before them ('min/min': fastest over fastest; 'spread': (max - min) / median of the products); the "
        "first product is its own column (it builds the "
        "first-order graph / the cached gradient). Memory: peak over the first two products of a measurement "
        "from rest (parameters + AdamW state resident, .grad None), solver vectors not counted. "
        "All rows except 'fused attention' run inside curvwatch's measurement guard (eval mode, math attention).",
        "",
        "## lambda_max to 1%",
        "",
        "| solver | HVPs | HVPs needed for 1% (vs reference) | rel. error | time (x step) | converged |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, row in r["measurements"].items():
        lines.append(
            f"| curvwatch.lanczos, residual rule tol=1e-2, {name} | {row['matvecs']} | "
            f"{row['matvecs_to_1pct_oracle'] if row['matvecs_to_1pct_oracle'] is not None else '> cap'} | "
            f"{_e(row['rel_error'])} | {_x(row['seconds'] / step, 1)} | {row['converged']} |"
        )
    cm = mem.get("curvwatch", {})
    if eig.get("available"):
        lz = eig["lanczos"]
        lines.append(
            f"| hessian-eigenthings lanczos(k=1, max_iter={lz['max_iter']}, which='LA') | {lz['matvecs']} | "
            f"{eig['iterations_to_1pct'] or '> ' + str(len(eig['lanczos_trajectory_rel_error']))} | "
            f"{_e(lz['rel_error'])} | "
            f"{_x(lz['seconds'] / step, 1)} | {lz['converged']} |"
        )
    if pyh.get("available"):
        pw = pyh["power_tol_0.01"]
        lines.append(
            f"| PyHessian eigenvalues(tol=1e-2) (power iteration) | {pw['iterations']} | "
            f"{pyh['iterations_to_1pct'] or '> ' + str(pyh['max_iter'])} | {_e(pw['rel_error'])} | "
            f"{_x(pw['seconds'] / step, 1)} | - |"
        )
        d = pyh["stop_tol_0.001"]
        lines.append(
            f"| PyHessian eigenvalues(tol=1e-3) (its default tol; from the same iterates) | {d['iterations']} | "
            f"| {_e(d['rel_error'])} | {_x(d['iterations'] * pyh['seconds_per_iteration'] / step, 1)} | "
            f"{'capped at ' + str(pyh['max_iter']) if d['capped'] else '-'} |"
        )
    lines += [
        "",
        "'HVPs needed for 1%': products after which the top Ritz value (power iterate) is first within 1% of the "
        "reference, replayed from the same start. Warm: started from the previous measurement's eigenvector "
        "after one more AdamW step (reference recomputed there). "
        + (
            "Peak memory of a cold measurement, Lanczos basis included: "
            f"{_x(cm.get('cold measurement', math.nan) / step_mem)} the step"
            + (
                f"; basis in host memory: {_x(cm['cold measurement, basis on CPU'] / step_mem)}."
                if "cold measurement, basis on CPU" in cm
                else "."
            )
        ),
        "",
        "## Hutchinson trace: cost of one sample",
        "",
        "| library | samples | HVPs | time per sample (x step) |",
        "| --- | ---: | ---: | ---: |",
    ]
    h = r["hutchinson"]
    lines.append(f"| curvwatch.hutchinson | {h['samples']} | {h['matvecs']} | {_x(h['seconds_per_sample'] / step)} "
                 f"({h['sample_over_hvp']:.2f}x one HVP) |")
    for label, peer in (("hessian-eigenthings hutchinson", eig), ("PyHessian trace", pyh)):
        if peer.get("available"):
            t = peer["hutchinson"]
            lines.append(f"| {label} | {t['samples']} | {t['matvecs']} | {_x(t['seconds_per_sample'] / step)} |")
    mon = r["monitor"]
    ms = mon["monitored_runs"][-1]["measurements"]
    lines += [
        "",
        "## Monitor overhead on training",
        "",
        f"{mon['steps']} AdamW steps from the same state, plain and with `CurvatureMonitor(model, probe, "
        f"criterion=..., every={mon['every']}).attach(optimizer)` (defaults: top_k=2, trace, Budget(max_hvps=60, "
        f"trace_hvps=10, tol=1e-3), preconditioned sharpness for AdamW), {mon['repeats']} alternating repeat(s).",
        "",
        "| run | seconds | x plain |",
        "| --- | ---: | ---: |",
    ]
    for a, b in zip(mon["plain_runs"], mon["monitored_runs"]):
        lines.append(f"| plain | {a['seconds']:.2f} | 1.00x |")
        lines.append(
            f"| monitored ({len(b['measurements'])} measurements) | {b['seconds']:.2f} | "
            f"{b['seconds'] / a['seconds']:.2f}x |"
        )
    lines += [
        "",
        f"Overhead {mon['overhead']:+.1%} (per repeat: {', '.join(f'{x:+.1%}' for x in mon['overhead_per_run'])}). "
        f"One measurement: {mon['mean_measurement_hvps']:.0f} HVPs, {mon['mean_measurement_s']:.2f} s = "
        f"{mon['mean_measurement_s'] / step:.0f} training steps"
        + (f" (converged: {', '.join(str(x['converged']) for x in ms)})." if ms else "."),
    ]
    if ms:
        lines[-1] += (f" The monitor ran method={ms[0]['method']!r}; its lambda_max: "
                      + ", ".join(f"{x['lambda_max']:.4g} (step {x['step']})" for x in ms)
                      + "; preconditioned: " + ", ".join(f"{x['preconditioned_lambda_max']:.4g}" for x in ms) + ".")
    if "peak_bytes" in mon["plain_runs"][0]:
        lines[-1] += (f" Peak memory of the training run: plain {mon['plain_runs'][-1]['peak_bytes'] / GiB:.2f} GiB, "
                      f"monitored {mon['monitored_runs'][-1]['peak_bytes'] / GiB:.2f} GiB.")
    lines += new_quantities_section(r.get("new_quantities"))
    lines += ["", f"## Goals ({GOALS})", "", "| goal | measured | met |", "| --- | --- | --- |"]
    d = r["products"].get(default, {})
    if "steady" in d:
        t = d["steady"]["median"] / (d.get("step_local") or r["step"])["median"]
        lines.append(f"| default HVP ({default}) <= 1.5x step time | {t:.2f}x | {'yes' if t <= 1.5 else 'no'} |")
        mm = cm.get(default, math.nan) / step_mem
        lines.append(f"| default HVP <= 1.3x step peak memory | {mm:.2f}x | {'yes' if mm <= 1.3 else 'no'} |")
        e = r["lanczos_30"].get(default, {}).get("rel_error")
        e = math.nan if e is None else e
        lines.append(
            f"| lambda_max within 1e-3 (Lanczos of up to 30 products, no certificate) | {e:.1e} | "
            f"{'yes' if e <= 1e-3 else 'no'} |"
        )
    c, w = r["measurements"]["cold"], r["measurements"]["warm (next step)"]
    cold_met = c["matvecs"] <= 20 and c["rel_error"] <= 1e-2
    warm_met = w["matvecs"] <= 5 and w["rel_error"] <= 1e-2
    lines.append(
        f"| 1% in <= 20 HVPs cold | {c['matvecs']} (error {c['rel_error']:.1e}) | {'yes' if cold_met else 'no'} |"
    )
    lines.append(
        f"| 1% in <= 5 HVPs warm | {w['matvecs']} (error {w['rel_error']:.1e}) | {'yes' if warm_met else 'no'} |"
    )
    lines.append(
        f"| one Hutchinson sample = one HVP | {h['matvecs']} HVPs for {h['samples']} samples | "
        f"{'yes' if h['matvecs'] == h['samples'] else 'no'} |"
    )
    lines.append(
        f"| monitor every={mon['every']} adds < 5% | {mon['overhead']:+.1%} | "
        f"{'yes' if mon['overhead'] < 0.05 else 'no'} |"
    )
    if r.get("notes"):
        lines += ["", "## Notes (written after the run, from the JSON)", ""] + [f"- {n}" for n in r["notes"]]
    skipped = [
        f"{n}: {p['reason']}" for n, p in (("hessian-eigenthings", eig), ("PyHessian", pyh)) if not p.get("available")
    ]
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def _ratio(seconds: float | None, local: dict[str, float] | None) -> float:
    """``seconds`` over the median of the training steps timed right before it."""
    if seconds is None or not local or not local.get("median"):
        return math.nan
    return seconds / local["median"]


def new_quantities_section(q: dict[str, Any] | None) -> list[str]:
    """Markdown lines: the cost of the update and critical sharpness, blocks and the Fisher product."""
    if not q:
        return []
    lines = [
        "",
        "## Cost of the newer quantities (update and critical sharpness, blocks, Fisher)",
        "",
        "Each time over the median of training steps timed right before it, from the same training state "
        "(AdamW; `benchmarks/new_quantities.py`).",
        "",
        "| quantity | what it runs | time (x step) |",
        "| --- | --- | ---: |",
    ]
    u = q.get("update_sharpness", {})
    if "steady" in u:
        lines.append(
            f"| update sharpness (`update_sharpness=True`) | one product along the last update, u^T H u / u^T P u "
            f"| {_x(_ratio(u['steady']['median'], u['step_local']))} (first product of a measurement: "
            f"{_x(_ratio(u['first_s'], u['step_local']))}) |"
        )
    c = q.get("critical_sharpness", {})
    if "search" in c:
        per = c["search"]["median"] / max(c["evals"], 1)
        lines.append(
            f"| critical sharpness (`critical_sharpness=True`) | line search: {c['evals']} forward passes "
            f"(at most {c['max_evals']} + L(theta)), {'bracketed' if c['bracketed'] else 'not bracketed'}, "
            f"no graph | {_x(_ratio(c['search']['median'], c['step_local']))} ({c['search']['median'] * 1e3:.0f} "
            f"ms; one pass {_x(_ratio(per, c['step_local']))}, a bare forward "
            f"{_x(_ratio(c['forward']['median'], c['step_local']))}) |"
        )
    products = q.get("products", {})
    hess = products.get("hessian (double_backward, graph reused)", {})
    for name, row in products.items():
        if name == "step_local" or not isinstance(row, dict):
            continue
        if "error" in row:
            lines.append(f"| product: {name} | failed: {row['error'][:80]} | - |")
            continue
        vs = ""
        if "steady" in hess and name != "hessian (double_backward, graph reused)":
            vs = f"; {row['steady']['median'] / hess['steady']['median']:.2f}x the Hessian product"
        lines.append(
            f"| product: {name} | one product, later ones of a measurement{vs} | "
            f"{_x(_ratio(row['steady']['median'], products['step_local']))} (first: "
            f"{_x(_ratio(row['first_s'], products['step_local']))}) |"
        )
    m = q.get("monitor")
    if m:
        summary, local = m["summary"], m["step_local"]
        base = summary.get("defaults", {})
        off = summary.get("without update/critical sharpness", {})
        blocks_key = next((k for k in summary if "blocks" in k), None)
        if base and off:
            search = statistics.median(x["critical_sharpness_seconds"] for x in m["runs"]["defaults"])
            lines.append(
                f"| monitor: update + critical sharpness | a cold `measure()` with defaults vs both off | "
                f"{_x(_ratio(base['median_s'] - off['median_s'], local))} "
                f"({base['median_hvps'] - off['median_hvps']:+g} HVPs; "
                f"whole measurement {_x(_ratio(base['median_s'], local), 1)}; the line search inside it: "
                f"{_x(_ratio(search, local))}) |"
            )
        if base and blocks_key:
            runs = m["runs"][blocks_key]
            names = list(runs[-1]["blocks"]) if runs else []
            per_block = ", ".join(f"{n}: {runs[-1]['blocks'][n]['hvps']}" for n in names)
            extra = summary[blocks_key]["median_s"] - base["median_s"]
            count = max(sum(1 for n in names if runs[-1]["blocks"][n]["hvps"] > 0), 1)  # blocks measured
            lines.append(
                f"| monitor: `blocks={m['blocks']!r}` ({len(names)} blocks) | the same plus every block "
                f"(lambda_max(H_bb), preconditioned) | {_x(_ratio(extra / count, local), 1)} per block "
                f"({summary[blocks_key]['median_hvps'] - base['median_hvps']:+g} HVPs in all; per block {per_block}) |"
            )
        lines += [
            "",
            f"Monitor rows: fresh monitors, cold, `strict=True`, `Budget(max_hvps={m['budget']['max_hvps']}, "
            f"trace_hvps={m['budget']['trace_hvps']}, overhead=None)` (room for every block), medians of "
            f"{len(next(iter(m['runs'].values())))} alternating repeat(s); the differences of whole measurements "
            "carry their noise.",
        ]
    return lines
