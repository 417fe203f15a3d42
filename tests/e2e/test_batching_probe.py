"""tools/batching_probe.py on a real server with the real perf_analyzer: the batches Triton's batcher forms.

Only the batches are checked, never a speed: with max_batch_size 1 every batch holds one request; with 4, eight
requests in flight on two instances fill batches of more than one and never more than four.
"""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

TOOL = Path(__file__).resolve().parents[2] / "tools" / "batching_probe.py"


def test_the_batcher_fills_batches_up_to_max(tmp_path):
    command = [sys.executable, str(TOOL), "--fixed-ms", "20", "--per-image-ms", "1", "--scale", "1", "--instances", "2",
               "--max", "1,4", "--concurrency", "8", "--seconds", "2", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "batching_probe.md").read_text().splitlines()
    rows = {int(cells[1]): cells for cells in (line.strip("|").split("|") for line in table if line.startswith("| 8 |"))}
    assert set(rows) == {1, 4}
    mean, biased = float(rows[1][4]), float(rows[1][5])
    assert mean == biased == 1.0  # one request a batch: no size to fit a line to
    assert rows[1][6].strip() == "—"
    mean, biased = float(rows[4][4]), float(rows[4][5])
    assert 1.5 < mean <= biased <= 4.0


def test_bad_settings_are_refused_before_a_server_starts():
    done = subprocess.run([sys.executable, str(TOOL), "--max", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "positive integers" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, str(TOOL), "--scale", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--scale and --seconds above 0" in done.stderr and "Traceback" not in done.stderr
