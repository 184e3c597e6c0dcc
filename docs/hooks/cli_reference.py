"""MkDocs hook: ``<!-- cli-reference -->`` in a page becomes the reference of the ``s2ft`` command line.

It is rendered at build time from the parser itself (``s2ft.cli.build_parser()``), so no option's text is written
twice: every subcommand (nested ones too), its description, and each group of options with its flags, choices,
default and help, as ``--help`` shows them. It asks argparse only for what any parser holds, so it does not depend
on how s2ft declares its options.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from typing import Any

MARKER = "<!-- cli-reference -->"


def _parser() -> argparse.ArgumentParser:
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")
    if os.path.isdir(src) and os.path.abspath(src) not in map(os.path.abspath, sys.path):
        sys.path.insert(0, os.path.abspath(src))
    from s2ft.cli import build_parser

    return build_parser()


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell."""
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|")


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((name, helps.get(name, ""), sub))
    return out


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    if isinstance(action, argparse.BooleanOptionalAction):
        return " / ".join(f"`{s}`" for s in action.option_strings)
    takes = "" if action.nargs == 0 else " " + (action.metavar or action.dest.upper())
    if action.nargs in ("+", "*"):
        takes += " ..."
    return ", ".join(f"`{s}{takes}`" for s in action.option_strings)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    extras = []
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        extras.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    default = action.default
    if (
        action.option_strings
        and action.nargs != 0
        and default not in (None, argparse.SUPPRESS)
        and "%(default)" not in (action.help or "")
    ):
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        extras.append(f"default `{shown}`")
    return "; ".join(p for p in [_cell(text), *extras] if p)


def _render(parser: argparse.ArgumentParser, path: str, level: int) -> list[str]:
    lines = []
    if parser.description:
        lines += [_cell(parser.description), ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    for group in parser._action_groups:
        actions = [
            a
            for a in group._group_actions
            if a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
        ]
        if not actions:
            continue
        lines += [f"**{group.title}**", "", "| option | description |", "|---|---|"]
        lines += [f"| {_flags(a)} | {_help(parser, a)} |" for a in actions]
        lines.append("")
    for name, help_text, sub in _subcommands(parser):
        lines += [f"{'#' * level} `{path} {name}`", ""]
        if help_text:
            lines += [_cell(help_text[0].upper() + help_text[1:]) + ".", ""]
        lines += _render(sub, f"{path} {name}", level + 1)
    return lines


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    parser = _parser()
    return markdown.replace(MARKER, "\n".join(_render(parser, parser.prog, 2)))
