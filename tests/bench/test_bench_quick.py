"""The benchmark harness works end to end (`--quick`): every request succeeds and every row is written.

No timing is asserted here; figures live in docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow


def test_quick_benchmark_runs_and_every_request_succeeds(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["errors"] == 0
    assert set(result["rows"]) == {
        "P1",
        "P1cpu",
        "P2",
        "P3",
        "P4",
        "P4cpu",
        "P4openai",
        "P5",
        "P5tt",
        "P6",
        "P7",
        "P8overload",
        "P8tenants",
        "P9api",
        "P9workers",
        "P10",
        "P11",
    }
    assert result["rows"]["P1"]["parley_rps"] > 0 and result["rows"]["P1"]["ceiling_rps"] > 0
    assert result["rows"]["P3"]["probes"] > 0
    assert result["rows"]["P4openai"]["completions_full_history_p50_ms"] > 0
    assert result["rows"]["P6"]["rebuild_eps"] > 0 and result["rows"]["P6"]["xrange_eps"] > 0
    assert result["rows"]["P11"]["fork_log_bytes_1000"] < result["rows"]["P11"]["parent_log_bytes_1000"]
    assert result["rows"]["P5tt"]["session_far_p50_ms"] > 0 and result["rows"]["P5tt"]["at_version_far_p50_ms"] > 0
    assert (tmp_path / "result.md").read_text().startswith("# Parley benchmark")
