"""The README stays true: its stage table is the registry's, and its commands exist."""

import re
import shutil
from pathlib import Path

from tritonpipe.stages.catalog import stage_table_markdown
from tritonpipe_tools.main import VERBS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_stage_table_is_current():
    start, end = "<!-- stage-table:start -->", "<!-- stage-table:end -->"
    table = README[README.index(start) + len(start) : README.index(end)].strip()
    assert table == stage_table_markdown(include_plugins=False), "refresh it with: tritonpipe generate --list-stages --markdown"


def _code(text: str) -> str:
    """The README's code: fenced blocks and inline spans."""
    return "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text))


def test_every_tritonpipe_command_in_the_readme_is_a_verb_of_the_installed_command():
    venv_bin = Path(__file__).resolve().parents[2] / ".venv" / "bin"
    assert (venv_bin / "tritonpipe").exists() or shutil.which("tritonpipe"), "the tritonpipe command is not installed"
    verbs = re.findall(r"(?<![\w.-])(?<!from )(?<!import )tritonpipe ([a-z][\w-]*)", _code(README))
    assert verbs, "the README shows no tritonpipe command"
    assert sorted(set(verbs) - set(VERBS)) == [], f"README names verbs that tritonpipe does not have; it has {VERBS}"


def test_the_readme_uses_the_one_command_not_the_old_names():
    old = sorted({f"tritonpipe-{verb}" for verb in VERBS if re.search(rf"tritonpipe-{verb}\b", README)})
    assert old == [], f"write `tritonpipe VERB` instead of {old}"


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
