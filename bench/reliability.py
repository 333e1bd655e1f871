"""Reliability figures, measured from outside: the bad-input catalogue, the fault drills and a Serve soak.

    python bench/reliability.py [--soak-requests 640] [--skip-drills]

1. The bad-input catalogue (``tests/unit/bad_input_cases.py``): every case run as a user would, its
   exit code or HTTP status, first error line, whether a traceback showed and what it left behind.
2. The fault drills (``tests/integration/test_fault_drills.py``, ``test_fault_drills_serve.py`` and the
   killed-worker run of ``test_train.py``), run by pytest with ``ASE_RAY_RELIABILITY_OUT`` set so that
   each drill writes its figures (rows in / out / lost / retried, requests failed during and after
   recovery); the soak (concurrency 32) with ``--soak-requests`` requests after warm-up.

Writes ``bench/results/reliability.json`` (``cases``, ``tracebacks``, ``rows_lost``, ``soak``, ``drills``)
and ``reliability.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DRILL_TESTS = [
    "tests/integration/test_fault_drills.py",
    "tests/integration/test_fault_drills_serve.py",
    "tests/integration/test_train.py::test_ddp_survives_a_worker_killed_from_outside_and_keeps_one_mlflow_run",
]


def run_catalogue(workdir: Path) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from tests.unit.bad_input_cases import run_catalogue as catalogue

    return catalogue(workdir)


def run_drills(out: Path, soak_requests: int) -> dict:
    """pytest over the drill tests, each writing ``drill_<name>.json`` into ``out``."""
    env = {**os.environ, "ASE_RAY_RELIABILITY_OUT": str(out), "ASE_RAY_SOAK_REQUESTS": str(soak_requests),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_THREAD_LIMIT": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DRILL_TESTS],
                            cwd=REPO, env=env, capture_output=True, text=True)
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    drills = [json.loads(p.read_text()) for p in sorted(out.glob("drill_*.json"))]
    return {"pytest_exit_code": result.returncode, "pytest_summary": summary,
            "seconds": round(time.perf_counter() - started, 1), "drills": drills}


def rows_lost(drills: list[dict]) -> int:
    """Rows lost over all drills (a drill of several runs records one count per run)."""
    counts = [d.get("rows_lost", 0) for d in drills]
    return int(sum(sum(c) if isinstance(c, list) else c for c in counts))


def markdown(payload: dict) -> str:
    lines = [f"Reliability, measured {payload['date']} on {payload['machine']}", ""]
    cases = payload["cases"]
    lines += [f"**Bad inputs**: {len(cases)} cases, {sum(c['ok'] for c in cases)} as documented, "
              f"{payload['tracebacks']} tracebacks.", "",
              "| case | entry | input | expected | got |", "|---|---|---|---|---|"]
    for c in cases:
        got = c.get("status", c.get("exit_code"))
        lines.append(f"| {c['name']} | {c['entry']} | {c['input']} | {c['expected']} | {got}: {c['message'][:90]} |")
    lines += ["", f"**Fault drills** ({payload['drill_run']['pytest_summary']}, {payload['drill_run']['seconds']} s); "
              f"rows lost over all drills: {payload['rows_lost']}.", ""]
    for d in payload["drills"]:
        figures = ", ".join(f"{k} {v}" for k, v in d.items() if k != "drill")
        lines.append(f"- `{d['drill']}`: {figures}")
    soak = payload["soak"]
    if soak:
        lines += ["", f"**Soak**: {soak['requests']} requests at concurrency {soak['concurrency']} "
                  f"({soak['warmup_requests']} warm-up): {soak['errors_5xx']} 5xx, p50 {soak['p50_ms']} ms, "
                  f"p99 {soak['p99_ms']} ms, {soak['req_per_s']} req/s; replica RSS growth after warm-up "
                  f"{soak['rss_growth'] * 100:.1f}% (largest of ingress, features, classifier)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak-requests", type=int, default=640)
    parser.add_argument("--skip-drills", action="store_true", help="the catalogue only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ase-ray-reliability-") as tmp:
        cases = run_catalogue(Path(tmp) / "catalogue")
        drill_run = {"pytest_exit_code": None, "pytest_summary": "skipped", "seconds": 0, "drills": []}
        if not args.skip_drills:
            drill_run = run_drills(Path(tmp) / "drills", args.soak_requests)
    drills = drill_run.pop("drills")
    soak = next((d for d in drills if d["drill"] == "soak"), None)
    payload = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "cases": cases,
        "tracebacks": sum(bool(c["traceback"]) for c in cases),
        "rows_lost": rows_lost(drills),
        "soak": soak and {k: v for k, v in soak.items() if k != "drill"},
        "drills": [d for d in drills if d["drill"] != "soak"],
        "drill_run": drill_run,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability.json").write_text(json.dumps(payload, indent=2, default=str))
    (RESULTS / "reliability.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0 if drill_run["pytest_exit_code"] in (0, None) and payload["tracebacks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
