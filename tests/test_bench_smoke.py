"""Every benchmark in bench/ still runs: each in its seconds-long ``--smoke`` mode.

Figures are printed (``pytest -s`` shows them), never asserted: a timing on a shared
machine is not a test. What is asserted is that the script runs to its end and writes
its JSON. ``bench/minimal_relay.py`` (the floor the gateway bench compares against) runs
inside ``bench_gateway.py --smoke``, both as a Starlette app and bare.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
#: Smoke-run elsewhere: bench_streamlog.py in test_streamlog_config.py (it checks its output).
ELSEWHERE = {"bench_streamlog.py"}
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py") if p.name not in ELSEWHERE)


def test_every_bench_script_has_a_smoke_run() -> None:
    found = {p.name for p in BENCH.glob("bench_*.py")}
    assert found == {"bench_capacity.py", "bench_client_events.py", "bench_faults.py", "bench_gateway.py",
                     "bench_limits.py",
                     "bench_local.py", "bench_local_runaway.py", "bench_partial_json.py",
                     "bench_workers.py",
                     *ELSEWHERE}, "a new bench needs its smoke run here"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-results")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_smoke(script: str, results: Path) -> None:
    out = results / (Path(script).stem + ".json")
    args = [sys.executable, str(BENCH / script), "--smoke", "--json", str(out)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=280, check=False,
                         cwd=results)
    print(run.stdout[-4000:], run.stderr[-2000:])  # the figures, for a reader with -s
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert json.loads(out.read_text())


def test_the_readme_table_is_made_from_one_run(results: Path) -> None:
    """``bench/run_all.py`` turns the JSON of the runs above into the README's table."""
    sys.path.insert(0, str(BENCH))
    try:
        import run_all
    finally:
        sys.path.remove(str(BENCH))
    text = run_all.table(results)
    print(text)
    assert text.startswith(run_all.BEGIN) and text.endswith(run_all.END)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    # client events (2 faces), local, partial JSON (2), gateway (CPU, floor, TTFT, paced, idle)
    assert len(rows) - 1 >= 9, text
    readme = (BENCH.parent / "README.md").read_text()
    assert run_all.BEGIN in readme and run_all.END in readme
