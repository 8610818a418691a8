"""The documentation says what the code does: every ``visiontune ...`` command shown in the README and the docs
site parses with the real parser (options and ``key=value`` overrides in any order, as users type them), and the
generated reference covers every command and every configuration key."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest

from visiontune.cli import build_parser, command_parsers
from visiontune.config import _SECTIONS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_SHELL_STOP = {"|", "||", "&&", ";", ">", ">>", "2>", "&", "2>&1"}


def _logical_lines(text: str) -> list[str]:
    """Lines of the fenced code blocks and inline code spans, with ``\\`` continuations joined."""
    out: list[str] = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        out += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    # An inline span naming a command alone ("`visiontune auto` chooses ...") mentions it; one with arguments shows it.
    out += [span for span in re.findall(r"`(visiontune [^`]+)`", prose) if len(span.split()) > 2]
    return out


def _command(line: str) -> list[str] | None:
    """The argument list after ``visiontune`` (or ``python -m visiontune``) on a shell line, or None."""
    line = line.strip().removeprefix("$ ")
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, w in enumerate(words):
        if w == "visiontune" or w.endswith("/visiontune") or (w in ("visiontune", "visiontune.cli") and words[i - 1] == "-m"):
            args = []
            for a in words[i + 1:]:
                if a in _SHELL_STOP or a.startswith((">", "2>")):
                    break
                args.append(a)
            return args or None
    return None


def _documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for line in _logical_lines(page.read_text()):
            args = _command(line)
            if args is not None and args[0] in command_parsers() or (args and args[0].startswith("-")):
                found.append((f"{page.relative_to(ROOT)}: visiontune {' '.join(args)}", args))
    return found


COMMANDS = _documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 40  # the pages were read, not skipped


@pytest.mark.parametrize("where, args", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(args)
        except SystemExit as e:
            assert e.code == 0, f"{where}\n{err.getvalue()}"


def test_cli_reference_covers_every_command_and_option():
    from visiontune.reference import cli_reference

    text = cli_reference()
    for name, parser in command_parsers().items():
        assert f"## visiontune {name}" in text
        for action in parser._actions:
            for option in action.option_strings if action.dest != "help" else ():
                assert f"`{option}`" in text, (name, option)


def test_config_reference_covers_every_key_and_method_option():
    from visiontune.config import MethodConfig
    from visiontune.reference import config_reference
    from visiontune.registry import METHODS

    text = config_reference()
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"`{section}.{f.name}`" in text
    base = {f.name for f in dataclasses.fields(MethodConfig)}
    for name in METHODS.names():
        assert f"### method.name={name}" in text
        for f in dataclasses.fields(METHODS.get(name).config_cls):
            if f.name not in base:
                assert f"`method.{f.name}`" in text, (name, f.name)
