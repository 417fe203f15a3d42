"""A per-release parity table at the end of the run (filled by test_pillow_releases.py); one torch thread."""

import pytest
import torch

_ROWS: list[tuple[str, ...]] = []
_HEADER = ("Pillow", "line", "device", "exact pairs", "max |diff|")


@pytest.fixture(scope="session")
def pillow_release_rows() -> list[tuple[str, ...]]:
    """Rows of :data:`_HEADER` to print after the tests."""
    return _ROWS


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    widths = [max(len(row[i]) for row in (_HEADER, *_ROWS)) for i in range(len(_HEADER))]
    terminalreporter.section("bilinear parity with each Pillow release")
    rows = sorted(_ROWS, key=lambda row: (tuple(int(part) for part in row[0].split(".")), row[2]))
    for row in (_HEADER, *rows):
        terminalreporter.write_line("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # kernel tests run hundreds of small tensor ops; on a busy 2-core box intra-op threads only add
    # contention and make the run erratic
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
