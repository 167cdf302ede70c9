"""The README's flag table and the flags the plugin registers are the same set (one fails when the other drifts)."""
import re
from pathlib import Path

from sglang_ams.engine.settings import ALL_NAMES

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_flag_table_matches_the_flags():
    text = README.read_text()
    table = text[text.index("## Flags"):text.index("**Per request**")]
    documented = set(re.findall(r"`--((?:kv|ams)-[a-z-]+)`", table))
    flags = {name.replace("_", "-") for name in ALL_NAMES}
    assert flags - documented == set(), "flags missing from the README table"
    assert documented - flags == set(), "README table names flags that do not exist"
