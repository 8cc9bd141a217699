#!/usr/bin/env python
"""Run every benchmark in full, then rewrite the README's performance table from that run.

    .venv/bin/python bench/run_all.py                 # ~15 minutes on 2 cores; run it on a
                                                      # quiet machine: figures are side by side
    .venv/bin/python bench/run_all.py --smoke         # the same path in seconds (no README)
    .venv/bin/python bench/run_all.py --from DIR      # only regenerate, from an earlier run

Each script writes its figures as JSON into ``bench/results/<date>/`` (kept, so the table
can be traced to the run that made it); the table between the README's
``<!-- bench-table:begin -->`` and ``<!-- bench-table:end -->`` markers is replaced, with
the date of the run. Nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
README = ROOT / "README.md"
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"
#: script → extra arguments of the full run.
RUNS = {
    "bench_client_events.py": [],
    "bench_local.py": [],
    "bench_partial_json.py": [],
    "bench_gateway.py": [],
    "bench_streamlog.py": [],
    "bench_workers.py": [],
    "bench_limits.py": [],
}
#: Scripts that print their figures but write no JSON (not in the table; output kept).
NO_JSON = {"bench_streamlog.py"}


def run_all(out: Path, smoke: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for script, extra in RUNS.items():
        target = out / (Path(script).stem + ".json")
        argv = [sys.executable, str(BENCH / script), *extra]
        if script not in NO_JSON:
            argv += ["--json", str(target)]
        if smoke:
            argv.append("--smoke")
        print(f"== {' '.join(argv[1:])}", flush=True)
        started = time.monotonic()
        with (out / (Path(script).stem + ".txt")).open("w") as log:
            done = subprocess.run(argv, cwd=ROOT, check=False, stdout=log)
        print(f"== {script}: exit {done.returncode} after {time.monotonic() - started:.0f} s",
              flush=True)
        if script not in NO_JSON and not target.exists():
            raise SystemExit(f"{script} wrote no figures ({target})")


def _f(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _ratio(a: Any, b: Any) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}×"


def table(out: Path) -> str:
    """The README table from the JSON figures of one run in ``out``."""
    def load(name: str) -> dict[str, Any]:
        path = out / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    rows: list[tuple[str, str, str]] = []
    client = load("bench_client_events")
    if client:
        us, ratio = client["us_per_event"], client["ratio_to_sdk_async"]
        for face in ("tokenrelay.astream", "tokenrelay.stream (sync)"):
            rows.append(((f"client CPU per content event, `{face.split()[0]}`"
                         f"{' (sync)' if 'sync' in face else ''}, vs the `openai` SDK,"
                         f" {client['chunks']:,} chunks over loopback"),
                         (f"{_f(us[face])} vs {_f(us['openai SDK (async)'])} µs:"
                         f" **{ratio[face]:.2f}×**"), "≤ 0.25×"))
    local = load("bench_local")
    for n, goal in (("256", "≥ 0.95×"), ("1024", "≥ 1.1×")):
        figures = local.get("tok_s", {}).get(n)
        if figures:
            rows.append((f"local provider vs raw llama-cpp-python, {n} tokens",
                         (f"{_f(figures['tokenrelay'])} vs {_f(figures['raw'])} tok/s:"
                         f" **{_ratio(figures['tokenrelay'], figures['raw'])}**"), goal))
    pj = load("bench_partial_json")
    if pj.get("vs_jiter_22kb"):
        v = pj["vs_jiter_22kb"]
        rows.append(("partial JSON, 22 KB in 4-char deltas, vs jiter re-parse per delta",
                     (f"{v['ours_s'] * 1e3:.1f} vs {v['jiter_s'] * 1e3:.0f} ms"
                     f" (**{v['jiter_s'] / v['ours_s']:.0f}×**)"), "≥ 30×"))
    if pj.get("growth"):
        rows.append(("… growth for 4× the size (" + ", ".join(
            f"{g['chars']:,}" for g in pj["growth"]) + " chars)", ", ".join(
            f"{g['ratio']:.2f}×" for g in pj["growth"]), "≤ 4.5×"))
    gw = load("bench_gateway")
    runs = gw.get("runs", {})
    levels = sorted({int(k.split("@")[1]) for k in runs})
    if levels:
        def at(name: str, key: str) -> list[Any]:
            return [runs.get(f"{name}@{c}", {}).get(key) for c in levels]

        cs = " / ".join(map(str, levels))
        cpu = at("tokenrelay", "gateway_cpu_us_per_chunk")
        rows.append((f"gateway CPU per relayed chunk, c = {cs} (request log on)",
                     " / ".join(_f(v) for v in cpu) + " µs", "≤ 50 µs"))
        floor = at("floor", "gateway_cpu_us_per_chunk")
        rows.append(("… vs the bare stack (`bench/minimal_relay.py` under Starlette)",
                     " / ".join(_ratio(a, b) for a, b in zip(cpu, floor, strict=True)), "—"))
        litellm = at("litellm", "gateway_cpu_us_per_chunk")
        if any(v is not None for v in litellm):
            rows.append(("… vs the LiteLLM proxy, same run",
                         " / ".join(_ratio(a, b) for a, b in zip(cpu, litellm, strict=True)),
                         "≤ ⅓"))
        added = at("tokenrelay", "added_ttft_p50_ms")
        rows.append((f"added time to first token p50, c = {cs}",
                     " / ".join(_f(v, 2) for v in added) + " ms", "≤ 2 ms"))
    paced = gw.get("paced", {})
    paced_levels = sorted({int(k.split("@")[1]) for k in paced})
    if paced_levels:
        added = [paced.get(f"tokenrelay@{c}", {}).get("added_ttft_p50_ms") for c in paced_levels]
        rows.append(((f"… c = {' / '.join(map(str, paced_levels))}, 50 tok/s streams arriving"
                     " as a Poisson process"), " / ".join(_f(v, 2) for v in added) + " ms",
                     "≤ 2 ms"))
    for idle in gw.get("idle", []):
        if idle.get("target") == "tokenrelay":
            rows.append((f"{idle['streams']:,} open idle streams",
                         (f"{_f(idle['kib_per_stream'])} KiB per stream,"
                         f" {idle['upstream_open']:,} at the upstream,"
                         f" `/healthz` {_f(idle['health_check_ms'], 0)} ms"), "—"))
    workers = load("bench_workers")
    floor = workers.get("floor", {})
    floor_levels = sorted({int(k.split("@")[1]) for k in floor if "@" in k})
    if floor_levels:
        def us(server: str, c: int) -> Any:
            return floor.get(f"{server}/w1@{c}", {}).get("cpu_us_per_chunk")

        rows.append((("HTTP server's floor per relayed chunk (`minimal_relay.py`), Granian vs"
                      f" uvicorn, 1 worker, c = {' / '.join(map(str, floor_levels))}"),
                     " / ".join(f"{_f(us('granian', c))} vs {_f(us('uvicorn', c))} µs"
                                for c in floor_levels), "the cheaper ships (uvicorn)"))
    scale = workers.get("scale", {})
    if scale.get("w1") and scale.get("w2"):
        one, two = scale["w1"], scale["w2"]
        share = two["cpu_share"]
        rows.append((("relayed chunks/s at saturation, `serve --workers 2` vs `--workers 1`"
                      " (CPU of the 2 cores with 2 workers: gateway / upstream / load generator"
                      " / other processes)"),
                     (f"{_f(two['chunks_per_s'], 0)} vs {_f(one['chunks_per_s'], 0)}:"
                      f" **{_ratio(two['chunks_per_s'], one['chunks_per_s'])}**"
                      f" ({share['gateway']:.0%} / {share['upstream']:.0%} /"
                      f" {share['load_generator']:.0%} / {share['other_processes']:.0%};"
                      f" the most 2 cores shared with upstream and load generator allow:"
                      f" {_f(scale.get('ceiling_speedup'), 2)}×)"),
                     "≥ 1.5×"))
    limits = load("bench_limits")
    for name, setup in limits.get("setups", {}).items():
        burst, paced = setup["burst"], setup["paced"]
        what = f"per-key limits (5 at once, 60/min), {limits['attempts']} attempts, {name}"
        figure = (f"at once: {burst['admitted']} admitted, most {burst['most_at_once']}"
                  f" running; paced: {paced['admitted']} in the minute, most"
                  f" {paced['most_at_once']} running")
        rows.append((what, figure, "5 / 5; 60 / ≤ 5"))
    cost = limits.get("cost", {})
    if "Redis" in cost and "in memory" in cost:
        shared, alone = cost["Redis"], cost["in memory"]
        figure = (f"{_f(shared['gateway_cpu_us_per_request'], 0)} /"
                  f" {_f(alone['gateway_cpu_us_per_request'], 0)} µs (+ redis-server"
                  f" {_f(shared['redis_cpu_us_per_request'], 0)} µs)")
        rows.append(("gateway CPU per request, limits in Redis / in memory", figure, "—"))
    date = next((d["date"] for d in (client, local, pj, gw, workers, limits)
                 if d.get("date")), "?")
    lines = [BEGIN, (f"Regenerated by `bench/run_all.py` from one run on {date}"
             f" ({os.cpu_count()} cores; figures in `bench/results/`)."), "",
             "| benchmark | figure | goal |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append(END)
    return "\n".join(lines)


def rewrite_readme(text: str) -> None:
    readme = README.read_text()
    if BEGIN in readme and END in readme:
        head, rest = readme.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        README.write_text(head + text + tail)
    else:
        raise SystemExit(f"README.md has no {BEGIN} … {END} block to replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="every bench in its smoke mode; prints the table, README untouched")
    parser.add_argument("--from", dest="source", metavar="DIR",
                        help="regenerate the table from the JSON of an earlier run")
    parser.add_argument("--out", metavar="DIR", help="where the JSON goes")
    args = parser.parse_args()
    if args.source:
        out = Path(args.source)
    else:
        out = Path(args.out) if args.out else \
            BENCH / "results" / time.strftime("%Y-%m-%d-%H%M", time.gmtime())
        run_all(out, args.smoke)
    text = table(out)
    print(text)
    if not args.smoke:
        rewrite_readme(text)
        print(f"README.md updated from {out}")


if __name__ == "__main__":
    main()
