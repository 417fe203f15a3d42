"""The README stays true: its stage table is the registry's, and its commands exist."""

import re
import shutil
from pathlib import Path

from tritonpipe.stages.catalog import stage_table_markdown

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_stage_table_is_current():
    start, end = "<!-- stage-table:start -->", "<!-- stage-table:end -->"
    table = README[README.index(start) + len(start) : README.index(end)].strip()
    assert table == stage_table_markdown(include_plugins=False), "refresh it with: tritonpipe-generate --list-stages"


def test_every_tritonpipe_command_in_the_readme_is_installed():
    commands = set(re.findall(r"(?<![/\w.-])(tritonpipe-[a-z-]+)", README))
    venv_bin = Path(__file__).resolve().parents[2] / ".venv" / "bin"
    missing = [c for c in commands if not (venv_bin / c).exists() and not shutil.which(c)]
    assert not missing, f"README names commands that are not installed: {missing}"
