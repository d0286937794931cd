"""The README's configuration table lists every setting, and nothing that is not one."""

from __future__ import annotations

import re
from pathlib import Path

from shared.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_configuration_table_lists_every_setting():
    table = README.read_text().split("### Configuration", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.M))
    expected = {"REDIS_URL" if f == "redis_url" else f"PARLEY_{f.upper()}" for f in Settings.__struct_fields__}
    assert listed == expected, {"missing": sorted(expected - listed), "not settings": sorted(listed - expected)}
