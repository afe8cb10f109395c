"""The README's demo, run as `make demo` runs it, read as a person reads its output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "pruning.py"


def test_the_demo_ends_with_its_results_table_and_report(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="the demo's data set ships with scikit-learn")
    outputs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, str(DEMO), str(tmp_path / "exp")],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
            cwd=tmp_path,
        )
        assert done.stderr == ""
        outputs.append(done.stdout)
    first, second = outputs
    assert first.startswith("first run: 13 executed, 0 cached")
    assert second.startswith("second run: 0 executed, 13 cached") and "(12 reused)" in second
    assert second.count(" run: ") == 1  # the run summary once
    table = second[second.index("per node:") :].splitlines()[1:15]
    assert table[0].split() == [
        "key", "tags", "lr", "prune", "prune", "again", "fine-tune", "epochs", "accuracy",
        "sparsity",
    ]  # fmt: skip
    rows = [line for line in table[2:] if line.strip()][:12]
    assert len(rows) == 12 and len(set(rows)) == 12  # every line distinguishable
    assert len({row.split("  ")[1].strip() for row in rows}) == 12  # by its tags alone
    written = second.strip().splitlines()[-1]
    assert written.startswith("report (") and written.endswith("report.html")
    report = tmp_path / "exp" / "report.html"
    assert report.stat().st_size > 10_000 and "<svg" in report.read_text()
