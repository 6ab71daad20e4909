"""docs/security.md says more than prose: every defence names the test file that proves it, and
the admin port's default is the one the code has. These tests keep both claims true."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from gateway.core.config import AdminConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "security.md").read_text()
DEFENCE_SECTIONS = ("## Before authentication", "## After authentication", "## Against the migration itself")


def section(heading: str) -> str:
    start = DOC.index(heading)
    end = DOC.find("\n## ", start + len(heading))
    return DOC[start:] if end < 0 else DOC[start:end]


def defence_rows() -> list[str]:
    """The body rows of the defence tables (not the header row nor its separator)."""
    rows = []
    for heading in DEFENCE_SECTIONS:
        table = [line for line in section(heading).splitlines() if line.startswith("|")]
        assert len(table) > 2, heading
        rows += table[2:]
    return rows


def named_tests(row: str) -> list[str]:
    return [name.strip() for bracket in re.findall(r"\[(test_[^\]]+)\]", row) for name in bracket.split(",")]


def test_every_defence_row_names_a_test_file() -> None:
    unnamed = [row.split("|")[1].strip() for row in defence_rows() if not named_tests(row)]
    assert unnamed == []


def test_every_test_file_the_page_names_exists() -> None:
    names = {name for row in defence_rows() for name in named_tests(row)} | set(re.findall(r"\[(test_\w+)\]", DOC))
    assert names and {name for name in names if not (ROOT / "tests" / f"{name}.py").is_file()} == set()


def test_the_admin_port_is_loopback_by_default_as_the_page_says() -> None:
    assert ipaddress.ip_address(AdminConfig().host).is_loopback
    assert "admin port (`admin`, loopback by default)" in DOC
    assert f"`admin.host` defaults to `{AdminConfig().host}`" in DOC
