"""The reference pages of the documentation, rendered from the code so they cannot drift from it: the command
line from :func:`visiontune.cli.build_parser`, the configuration keys from the config dataclasses (their types,
defaults and ``help`` metadata) and every registered method's own options.

``mkdocs build`` calls :func:`cli_reference` and :func:`config_reference` through ``docs/hooks.py``; nothing
generated is committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from visiontune.cli import build_parser, command_parsers
from visiontune.config import _SECTIONS, MethodConfig
from visiontune.registry import METHODS


def _cell(text: Any) -> str:
    """Text that is safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split())  # one line: argparse wraps at the terminal's width


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | help |", "|:---|:---|:---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            names += " {" + ", ".join(str(c) for c in action.choices) + "}"
        default = "" if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings else f"`{action.default}`"
        rows.append(f"| {names} | {default} | {_cell((action.help or '').replace('%%', '%'))} |")
    return rows


def cli_reference() -> str:
    """Every ``visiontune`` command: its usage line, description and arguments."""
    parser = build_parser()
    out = ["# Command line", "", "Generated from the parser (`visiontune.cli.build_parser`) when the site is built.",
           "Options and `key=value` overrides may come in any order. `python -m visiontune` is the same program.", "",
           f"`{_usage(parser)}`", ""]
    for name, sub in command_parsers(parser).items():
        out += [f"## visiontune {name}", "", f"`{_usage(sub)}`", ""]
        if sub.description:
            out += [sub.description, ""]
        out += _option_rows(sub) + [""]
    return "\n".join(out)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    text = tp if isinstance(tp, str) else str(tp) if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))
    return text.replace("typing.", "")


def _field_rows(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | meaning |", "|:---|:---|:---|:---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f"`{f.default_factory()!r}`"  # type: ignore[misc]
        else:
            default = "required"
        rows.append(f"| `{prefix}.{f.name}` | `{_cell(_type_name(hints.get(f.name, f.type)))}` | {_cell(default)} | "
                    f"{_cell(f.metadata.get('help', ''))} |")
    return rows


def config_reference() -> str:
    """Every configuration key (``section.key``): type, default and meaning; then each method's own options."""
    out = ["# Configuration", "",
           "Generated from the config dataclasses (`visiontune.config`) when the site is built. The same dotted keys",
           "work in YAML files, as command-line overrides (`visiontune train method.name=lora optim.lr=1e-3`) and in",
           "Python (`vt.load_config(path, overrides=[...])`).", ""]
    for section, cls in _SECTIONS.items():
        out += [f"## {section}", "", (cls.__doc__ or "").strip().split("\n")[0], ""] + _field_rows(cls, section) + [""]
    base = {f.name for f in dataclasses.fields(MethodConfig)}
    out += ["## method", "", "`method.name` picks the method; each method adds its own options:", ""]
    for name in METHODS.names():
        cls = METHODS.get(name).config_cls
        summary = METHODS.get(name).summary or METHODS.help(name)
        out += [f"### method.name={name}", "", summary, ""]
        own = [f for f in dataclasses.fields(cls) if f.name not in base]
        if own:
            rows = _field_rows(cls, "method")
            out += rows[:2] + [r for r in rows[2:] if r.split("`")[1].removeprefix("method.") not in base] + [""]
        else:
            out += ["No options of its own.", ""]
    return "\n".join(out)
