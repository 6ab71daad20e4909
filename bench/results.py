"""The benchmark's numbers: one scenario's metrics from the load generator's report and
the /proc readings, the medians over runs, and the table `docs/benchmarks.md` shows."""

from __future__ import annotations

import statistics
from typing import Any


def metrics(scenario: str, kind: str, report: dict[str, Any], seen: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one scenario on one path. For `direct`, "proxy" figures are the backend's."""
    cpu, wall = seen.get("cpu_s", {}), seen.get("wall_s") or 1.0
    proxy_role = "proxy" if kind != "direct" else "backend"
    busy = {f"{role}_cpu_pct": 100 * cpu[role] / wall for role in ("loadgen", "proxy", "backend") if role in cpu}
    trouble = {k: report.get(k, 0) for k in ("errors", "unexpected_closes", "bad_echoes", "failed", "lost", "failures")
               if report.get(k)}
    if report.get("error_samples"):
        trouble["error_samples"] = report["error_samples"]
    out: dict[str, Any] = {**busy, **trouble}
    if scenario in ("sat64", "satlarge", "deflate64"):
        n = max(report["echoed"], 1)
        out.update(msgs_per_s=report["msgs_per_s"], echoed=report["echoed"],
                   cpu_us_per_msg=1e6 * cpu[proxy_role] / n, backend_cpu_us_per_msg=1e6 * cpu["backend"] / n,
                   loadgen_cpu_us_per_msg=1e6 * cpu["loadgen"] / n)
    elif scenario == "latency":
        rtt = report["rtt_ms"]
        out.update(p50_ms=rtt["p50"], p90_ms=rtt["p90"], p99_ms=rtt["p99"], max_ms=rtt["max"],
                   samples=rtt["samples"], msgs_per_s=report["msgs_per_s"])
    elif scenario == "idle":
        opened = seen["opened"]["opened"]
        before, after = seen["rss_before_kib"], seen["rss_after_kib"]
        out.update(sessions=opened, open_seconds=seen["opened"]["open_seconds"],
                   timed_out=seen["opened"].get("timed_out", False),
                   rss_before_kib=before[proxy_role], rss_after_kib=after[proxy_role],
                   kib_per_session=(after[proxy_role] - before[proxy_role]) / max(opened, 1),
                   backend_kib_per_session=(after["backend"] - before["backend"]) / max(opened, 1),
                   still_open=report.get("still_open"))
    elif scenario == "setup":
        n = max(report["completed"], 1)
        out.update(handshakes_per_s=report["handshakes_per_s"], completed=report["completed"],
                   cpu_us_per_setup=1e6 * cpu[proxy_role] / n, backend_cpu_us_per_setup=1e6 * cpu["backend"] / n,
                   loadgen_cpu_us_per_setup=1e6 * cpu["loadgen"] / n, open_ms_p50=report["open_ms"]["p50"])
    return out


def brief(scenario: str, m: dict[str, Any]) -> str:
    if "error" in m:
        return f"error: {m['error']}"
    if scenario in ("sat64", "satlarge", "deflate64"):
        text = f"{m['msgs_per_s']:,.0f} msgs/s, {m['cpu_us_per_msg']:.1f} µs/msg"
    elif scenario == "latency":
        text = f"p50 {m['p50_ms']:.3f} ms, p99 {m['p99_ms']:.3f} ms"
    elif scenario == "idle":
        text = f"{m['sessions']} sessions in {m['open_seconds']:.1f} s, {m['kib_per_session']:.1f} KiB each"
    else:
        text = f"{m['handshakes_per_s']:,.0f}/s, {m['cpu_us_per_setup']:.0f} µs each"
    text += f" (CPU % load gen {m.get('loadgen_cpu_pct', 0):.0f}"
    if "proxy_cpu_pct" in m:
        text += f", proxy {m['proxy_cpu_pct']:.0f}"
    text += f", backend {m.get('backend_cpu_pct', 0):.0f})"
    problems = {k: m[k] for k in ("errors", "unexpected_closes", "bad_echoes", "failed", "lost", "failures") if m.get(k)}
    if problems:
        text += f" PROBLEMS {problems}"
    return text


def medians(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in {p for run in runs for p in run}:
        for scenario in {s for run in runs for s in run.get(path, {})}:
            values = [run[path][scenario] for run in runs if scenario in run.get(path, {})]
            good = [v for v in values if "error" not in v]
            if not good:
                out.setdefault(path, {})[scenario] = {"error": values[0]["error"]}
                continue
            merged: dict[str, Any] = {"runs": len(good)}
            for key in good[0]:
                numbers = [v[key] for v in good if isinstance(v.get(key), (int, float)) and not isinstance(v.get(key), bool)]
                if numbers:
                    merged[key] = statistics.median(numbers)
            if len(good) < len(values):
                merged["failed_runs"] = len(values) - len(good)
            out.setdefault(path, {})[scenario] = merged
    return out


# -- the table --------------------------------------------------------------------------------


def fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100 and digits <= 1:
        text = f"{value:,.0f}"
    else:
        text = f"{value:,.{digits}f}"
    return text + unit


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    r = a / b
    return f"{r:.2f}×" if r < 10 else f"{r:.0f}×"


def get(med: dict[str, dict[str, Any]], path: str, scenario: str, key: str) -> float | None:
    value = med.get(path, {}).get(scenario, {}).get(key)
    return value if isinstance(value, (int, float)) else None


def render_table(med: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    s = meta["settings"]
    size_large = s["large_size"]
    large = f"{size_large // 1024} KiB" if size_large % 1024 == 0 else f"{size_large} B"
    rows: list[tuple[str, str, str, str, str, str]] = []

    def row(label: str, scenario: str, key: str, unit: str, digits: int = 1, cpu_like: bool = False) -> None:
        d, n, g = (get(med, p, scenario, key) for p in ("direct", "nginx", "gateway"))
        dtext = fmt(d, unit, digits)
        if cpu_like and d is not None:
            dtext = f"({dtext})"
        rows.append((label, dtext, fmt(n, unit, digits), fmt(g, unit, digits), ratio(g, n), ratio(g, d)))

    rows.append((f"saturation 64 B ({s['conns']} conns × {s['inflight']} in flight)", "", "", "", "", ""))
    row("  echoed msgs/s", "sat64", "msgs_per_s", "", 0)
    row("  proxy CPU per echoed message", "sat64", "cpu_us_per_msg", " µs", 1, True)
    rows.append((f"saturation {large}", "", "", "", "", ""))
    row("  echoed msgs/s", "satlarge", "msgs_per_s", "", 0)
    row("  proxy CPU per echoed message", "satlarge", "cpu_us_per_msg", " µs", 1, True)
    rows.append((f"latency at {s['rate']:,} msgs/s, 64 B ({s['latency_conns']} conns)", "", "", "", "", ""))
    for q in ("p50", "p90", "p99"):
        row(f"  round trip {q}", "latency", f"{q}_ms", " ms", 3)
    d50, n50, g50 = (get(med, p, "latency", "p50_ms") for p in ("direct", "nginx", "gateway"))
    n_add = None if n50 is None or d50 is None else n50 - d50
    g_add = None if g50 is None or d50 is None else g50 - d50
    rows.append(("  added median over direct", "—", ("+" + fmt(n_add, " ms", 3)) if n_add is not None else "—",
                 ("+" + fmt(g_add, " ms", 3)) if g_add is not None else "—", ratio(g_add, n_add), ""))
    rows.append((f"idle sessions ({s['idle_sessions']:,})", "", "", "", "", ""))
    row("  RSS per idle session", "idle", "kib_per_session", " KiB", 1, True)
    rows.append((f"set-up ({s['setup_loops']} concurrent loops, {s['setup_mode']})", "", "", "", "", ""))
    row("  handshakes per second", "setup", "handshakes_per_s", "", 0)
    row("  proxy CPU per session set-up", "setup", "cpu_us_per_setup", " µs", 0, True)
    rows.append(("permessage-deflate clients, 64 B saturation", "", "", "", "", ""))
    row("  echoed msgs/s", "deflate64", "msgs_per_s", "", 0)
    row("  proxy CPU per echoed message", "deflate64", "cpu_us_per_msg", " µs", 1, True)

    head = ("", "direct¹", "nginx, 1 worker", "ws-gateway", "gw ÷ nginx", "gw ÷ direct¹")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(6)]
    lines = [
        f"ws-gateway benchmark — {meta['machine']['cores']} cores ({meta['machine']['cpu']}), "
        f"median of {s['runs']} run(s), loopback, Node ws load generator",
        f"legacy clients (?token=), {s['frame']} frames, no compression except the deflate rows; gateway log level WARNING "
        f"(set-up: INFO); gateway pings every {s['ping_interval']:g} s; nginx access_log off",
        "",
    ]
    fmt_line = "  ".join(["{:<%d}" % widths[0]] + ["{:>%d}" % w for w in widths[1:]])
    lines.append(fmt_line.format(*head))
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(fmt_line.format(*r))
    lines.append("")
    lines.append("¹ direct: the clients talk to the echo backend itself. There is no proxy: figures in parentheses are")
    lines.append("  the backend's own CPU or memory, and the gw ÷ direct column compares the gateway's cost with the backend's.")
    lines.append("  CPU per message = utime + stime of the proxy's whole process tree over the window ÷ echoed messages")
    lines.append("  (one frame each way through the proxy).")

    workers = [p for p in med if p.startswith("gateway-w")]
    for p in workers:
        n_workers = int(p.split("-w")[1])
        w = med[p].get("sat64", {})
        one = get(med, "gateway", "sat64", "msgs_per_s")
        if "error" in w:
            lines.append(f"\nworkers scaling (--workers {n_workers}): not measured: {w['error']}")
        elif one:
            lines.append(f"\nworkers scaling: --workers {n_workers}, saturation 64 B: {w['msgs_per_s']:,.0f} msgs/s = "
                         f"{w['msgs_per_s'] / one:.2f}× one worker ({one:,.0f}); goal ≥ {0.9 * n_workers:.1f}×; "
                         f"CPU {w.get('cpu_us_per_msg', 0):.1f} µs/msg; load generator at {w.get('loadgen_cpu_pct', 0):.0f} % "
                         "of a core")

    lines.append("")
    lines.append("CPU busy during each window, % of one core — load generator / proxy / backend:")
    names = {"sat64": "saturation 64 B", "satlarge": f"saturation {large}", "latency": "latency",
             "idle": "idle (opening)", "setup": "set-up", "deflate64": "deflate 64 B"}
    paths = [p for p in ("direct", "nginx", "gateway", *workers) if p in med]
    lines.append("  {:<18}".format("") + "".join(f"{p:>22}" for p in paths))
    for scenario in ("sat64", "satlarge", "latency", "setup", "deflate64"):
        cells = []
        for p in paths:
            m = med.get(p, {}).get(scenario)
            if not m or "error" in m:
                cells.append("—" if not m else "error")
                continue
            proxy = "–" if p == "direct" else f"{m.get('proxy_cpu_pct', 0):.0f}"
            cells.append(f"{m.get('loadgen_cpu_pct', 0):.0f} / {proxy} / {m.get('backend_cpu_pct', 0):.0f}")
        if any(c != "—" for c in cells):
            lines.append("  {:<18}".format(names[scenario]) + "".join(f"{c:>22}" for c in cells))
    hot = [(p, sc) for p in paths for sc, m in med.get(p, {}).items() if (m.get("loadgen_cpu_pct") or 0) >= 90]
    if hot:
        lines.append("  note: the load generator was at ≥ 90 % of a core in " + ", ".join(f"{p}/{sc}" for p, sc in hot)
                     + ": there its throughput is the load generator's; the CPU-per-unit figures still hold.")
    problems = [(p, sc, m) for p in med for sc, m in med[p].items() if "error" in m or m.get("failed_runs")]
    for p, sc, m in problems:
        lines.append(f"  problem: {p}/{sc}: {m.get('error') or str(m.get('failed_runs')) + ' run(s) failed'}")
    return "\n".join(lines)
