"""The bad-input catalogue (tests/unit/bad_input_cases.py): every case is refused with a one-line
`error:` and exit 2 (bad rows of `data validate`: listed, exit 1), or its documented HTTP status and
error code; never a traceback; nothing left behind in the case's folder, and its inputs unchanged."""

from __future__ import annotations

import pytest

from tests.unit.bad_input_cases import CASES, run_catalogue

# The first test also runs the module's catalogue: 64 CLI subprocesses, about 10 minutes on a slow machine.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    """The whole catalogue, run once (cases in parallel); the parametrised test reads its own record."""
    return {r["name"]: r for r in run_catalogue(tmp_path_factory.mktemp("bad_inputs"))}


def test_the_catalogue_covers_every_entry_point():
    entries = {c.entry for c in CASES}
    for wanted in ("config file", "--set", "data validate", "data split", "data augment", "data synth",
                   "data import magnetic-tile", "features", "train", "evaluate", "ablate", "register",
                   "predict", "serve", "search space", "registry URI", "job args", "Serve /predict",
                   "Serve /predict/batch"):
        assert wanted in entries, wanted
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(case, records):
    record = records[case.name]
    assert record["traceback"] is False, record["message"]
    assert record["leftovers"] == [], f"the failed command left {record['leftovers']}"
    if case.status is not None:
        assert record["status"] == case.status, record["message"]
        assert record["message"].startswith(f"{case.status} {case.code}:"), record["message"]
    else:
        assert record["exit_code"] == case.exit_code, record["message"]
        assert case.keyword in record["message"], record["message"]
        assert record["error_lines"] == (1 if case.exit_code == 2 else 0), record["message"]
        if case.exit_code == 2:
            assert record["message"].startswith("error: ")
    assert record["ok"], record["problems"]
