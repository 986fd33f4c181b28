"""Every default of every rdm command is the library's: no option carries a default of its own (a value other than
unset, off or empty), and each one taken from the library equals the field or parameter it names."""

from __future__ import annotations

import dataclasses

import click

from rdm.cli import main
from rdm.cli.options import LibraryDefaultOption, library_default


def commands(group: click.Group, prefix: str = "rdm"):
    for name, command in sorted(group.commands.items()):
        yield f"{prefix} {name}", command
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix} {name}")


UNSET = getattr(click.core, "UNSET", None)  # click >= 8.2 marks "no default given" with a sentinel


def unset(param: click.Parameter) -> bool:
    """No default of its own: none given, None, a flag that is off, an empty repeatable option."""
    if param.default is UNSET or param.default is None:
        return True
    if isinstance(param, click.Option) and param.is_flag and param.default is False:
        return True
    return bool(param.multiple) and param.default in ((), [])


def test_no_command_writes_a_default_of_its_own():
    own, from_library = [], 0
    for name, command in commands(main):
        for param in command.params:
            if isinstance(param, LibraryDefaultOption):
                expected = library_default(param.default_from)
                expected = param.to_cli(expected) if param.to_cli else expected
                assert param.resolve_default() == expected, f"{name} {param.opts}: {param.default_from}"
                from_library += 1
            elif not unset(param):
                own.append(f"{name} {'/'.join(param.opts)} = {param.default!r}")
    assert not own, "defaults written in the CLI instead of the library:\n" + "\n".join(own)
    assert from_library >= 30  # the build, search, score, serve, toyart, demo, sample, convert and train defaults


def test_the_defaults_shown_are_the_ones_used(monkeypatch):
    """--help shows the library's value, and a dataclass default changed in the library changes the command's."""
    from click.testing import CliRunner

    from rdm.service.config import ServeConfig

    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert f"[default: {ServeConfig().port}" in help_text.replace("\n", " ")
    port = next(p for p in main.commands["serve"].params if p.name == "port")
    monkeypatch.setattr(port, "default", port.default)  # both restored after the test
    monkeypatch.setattr(port, "_resolved", False)

    @dataclasses.dataclass(frozen=ServeConfig.__dataclass_params__.frozen)
    class Changed(ServeConfig):
        port: int = 8123

    monkeypatch.setattr("rdm.service.config.ServeConfig", Changed)
    assert port.resolve_default() == 8123
