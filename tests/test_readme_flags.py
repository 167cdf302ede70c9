"""The README's flag table is the one generated from the settings' declarations (names, defaults, ranges, help),
and those declarations are the flags the plugin registers and the ranges it enforces: drift in any of them fails."""
import argparse
import re
from pathlib import Path

import pytest

from sglang_ams.config import PolicyConfig
from sglang_ams.engine.settings import ALL_NAMES, EngineSettings, readme_flag_table
from sglang_ams.settings_fields import ConfigError, specs

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_table() -> str:
    text = README.read_text()
    start = text.index("| flag | default |", text.index("## Flags"))
    return text[start:text.index("\n\n", start) + 1]


def test_readme_flag_table_is_the_generated_one():
    assert _readme_table() == readme_flag_table(), "README flag table drifted: paste the output of `sglang-ams flags`"


def test_readme_flag_table_matches_the_flags():
    documented = set(re.findall(r"^\| `--((?:kv|ams)-[a-z-]+)`", _readme_table(), flags=re.M))
    flags = {name.replace("_", "-") for name in ALL_NAMES}
    assert flags - documented == set(), "flags missing from the README table"
    assert documented - flags == set(), "README table names flags that do not exist"


def test_cli_flags_are_generated_from_the_declarations():
    from sglang_ams.patches.server_args import add_cli_args_hook
    parser = argparse.ArgumentParser()
    add_cli_args_hook(None, parser)
    actions = {a.dest: a for a in parser._actions if a.dest in ALL_NAMES}
    assert set(actions) == set(ALL_NAMES)
    for cls in (PolicyConfig, EngineSettings):
        for field, spec in specs(cls).items():
            action = actions[spec.name]
            assert action.option_strings == [spec.flag] and action.default == getattr(cls(), field)
            assert spec.range.describe() in action.help
    assert parser.parse_args(["--ams-use-credit", "false", "--kv-budget", "64"]).ams_use_credit is False


def test_the_table_names_the_range_that_validation_enforces():
    """Each declared range is what validation says when the value is refused (one message, two readers)."""
    bad = {"kv_policy": "fast", "kv_interval": 0, "ams_delta": 0.0, "ams_sink": -1, "ams_use_mass": "yes",
           "ams_triattention_stats": 3, "ams_prompt_cache": "shared", "ams_ring_rows": -1, "ams_batch_slack": 1.0,
           "ams_workspace_mib": -1, "ams_warmup": 1, "ams_step_requests": -1}
    from sglang_ams.engine.settings import from_user_values
    for cls in (PolicyConfig, EngineSettings):
        for spec in specs(cls).values():
            if spec.name not in bad:
                continue
            with pytest.raises(ConfigError) as err:
                from_user_values({spec.name: bad[spec.name]})
            assert err.value.field == spec.name and err.value.valid == spec.range.describe()


def test_sglang_ams_flags_prints_the_table(capsys):
    from sglang_ams.cli import main
    assert main(["flags"]) == 0
    assert capsys.readouterr().out == readme_flag_table()
