"""The README's configuration reference matches the code (issue 11: a first user reads it first)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from session_watchdog import cli, platforms
from session_watchdog.config import KEYS, KEYS_BY_NAME, Config, load_config

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def key_table() -> dict:
    """{key: default cell} from the configuration table (a row may list several keys)."""
    rows = {}
    for line in section("Configuration").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_]+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(", ")] if len(names) > 1 else [cells[1]]
        for index, name in enumerate(names):
            rows[name] = defaults[index] if len(defaults) == len(names) else cells[1]
    return rows


class TestConfigurationTable:
    def test_every_key_has_a_row(self):
        """Every config key, and no other name, is in the README's key table."""
        assert sorted(key_table()) == sorted(key.name for key in KEYS)

    def test_literal_defaults_are_the_real_ones(self):
        """A default written as one literal (`5s`, `20MiB`, `60m,15m`) parses to Config()'s value."""
        checked = []
        for name, cell in key_table().items():
            literal = re.fullmatch(r"`([^`]+)`", cell)
            if literal is None:
                continue  # platform-dependent or prose: checked below or by hand
            assert KEYS_BY_NAME[name].parse(literal.group(1)) == getattr(Config(), name), name
            checked.append(name)
        assert len(checked) >= 20  # the table keeps its literals

    @pytest.mark.parametrize("platform, seconds", [("colab", 120.0), ("autodl", 120.0), ("generic", 60.0)])
    def test_grace_defaults_agree_in_readme_help_and_code(self, platform, seconds, capsys):
        """grace: 2m on Colab/AutoDL, 1m elsewhere, in the README row, in --help, and resolved."""
        resolved = platforms.resolve(Config(), platforms.Platform(platform, ("test",)))
        assert resolved.grace == seconds
        assert key_table()["grace"] == "`2m` on Colab/AutoDL, `1m` elsewhere"
        assert cli.main(["run", "--help"]) == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert "cancellable wait before ending (default 2m on Colab/AutoDL, 1m elsewhere)" in help_text


class TestExampleToml:
    def test_the_example_loads_on_a_machine_without_drive(self, tmp_path):
        """The README's example TOML is valid as written, with no /content/drive here."""
        block = re.search(r"An example TOML file[^\n]*\n\n```toml\n(.*?)```", section("Configuration"),
                          re.DOTALL)
        assert block is not None
        path = tmp_path / "watchdog.toml"
        path.write_text(block.group(1))
        config = load_config(path, env={})
        assert (config.tier, config.max_session, config.checkpoint_every, config.warn_before,
                config.grace, config.disk_margin) == ("colab-pro", 23.5 * 3600, 1200.0,
                                                      (3600.0, 900.0), 300.0, 2 * 2**30)
