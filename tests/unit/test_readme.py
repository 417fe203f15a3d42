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


def test_custom_stage_listing_is_the_example_file():
    root = Path(__file__).resolve().parents[2]
    source = (root / "examples" / "custom_stage" / "my_stages.py").read_text()
    start = "```python\n# examples/custom_stage/my_stages.py\n"
    listing = README[README.index(start) + len(start) :].split("```\n", 1)[0]
    assert listing == source


def test_every_module_path_in_the_layout_exists():
    root = Path(__file__).resolve().parents[2]
    layout = README[README.index("## Layout") :]
    paths = re.findall(r"`(python_backends/tritonpipe/[\w/.]*)`", layout)
    assert paths and all((root / p).exists() for p in paths), [p for p in paths if not (root / p).exists()]
    for row in re.findall(r"^\| `(python_backends/tritonpipe/[^|]*)\|", layout, re.M):
        folder = re.match(r"[\w/]+/", row.split("`")[0]).group(0)
        for name in re.findall(r"`([\w]+\.py)`", row):
            assert (root / folder / name).exists() or (root / "python_backends/tritonpipe" / name).exists(), name
