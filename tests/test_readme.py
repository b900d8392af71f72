"""The README as a new user meets it: the quick start and the test command as promised, a table of contents whose
links all land on a section, and no pointer to files outside the repository."""
from __future__ import annotations

import re

from conftest import REPO

README = (REPO / "README.md").read_text()
QUICK_START = ("bash scripts/install.sh && python edit.py --config configs/demo.yaml",
               "bash scripts/install.sh test && python -m pytest -q")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but - and _), spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_quick_start_is_two_commands_and_the_test_command_is_pytest():
    block = README.split("## Quick start (two commands, offline)")[1].split("```bash")[1].split("```")[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == list(QUICK_START)
    assert "`python -m pytest -q`" in README.split("## Tests")[1]


def test_the_table_of_contents_links_every_section():
    contents = README.split("Contents:")[1].split("\n\n")[0]
    anchors = re.findall(r"\]\(#([^)]+)\)", contents)
    headings = {slug(h): h for h in re.findall(r"^#{2,3} (.+)$", README, flags=re.M)}
    assert [a for a in anchors if a not in headings] == []  # every link lands on a heading
    sections = [slug(h) for h in re.findall(r"^## (.+)$", README, flags=re.M)]
    assert [s for s in sections if s not in anchors] == []  # every section is listed


def test_no_pointer_outside_the_repository():
    assert re.findall(r"\.\./|/work/", README) == []
