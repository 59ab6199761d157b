"""The README's recipe-key table is generated from the dataclasses; keep them equal."""

import re
from pathlib import Path

from ftdist.config import keys_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_recipe_key_table_matches_dataclasses():
    text = README.read_text()
    m = re.search(r"<!-- keys:start -->\n(.*?)\n<!-- keys:end -->", text, re.S)
    assert m, "README.md lost its <!-- keys:start --> / <!-- keys:end --> markers"
    assert m.group(1).strip() == keys_markdown().strip(), (
        "README recipe-key table is stale: regenerate it with python -c 'from ftdist.config import keys_markdown; print(keys_markdown())'")


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = "python3 -m pytest -q -n 2 --dist loadgroup"
    assert f"The test command itself is `{command}`" in README.read_text()
    assert ci.rstrip().splitlines()[-1] == command
