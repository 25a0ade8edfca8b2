"""``--help`` that shows every option's default: the formatter of the ``straightflow`` command and of
the benchmark suites' parsers (``benchmarks/harness.py`` imports it from here)."""
from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "show_defaults"]


def _default_note(action) -> str:
    """``(default: X)`` for ``--help``: ``none`` for an unset option, a list as it is typed (``1,2,4``)."""
    d = action.default
    if d is None:
        return "(default: none)"
    if isinstance(d, (list, tuple)):  # as typed on the command line: 1,2,4, not [1, 2, 4]
        return "(default: " + ",".join(str(v) for v in d).replace("%", "%%") + ")"
    return "(default: %(default)s)"


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with every option's default (unless its help already names it, the option is required or
    a switch): ``none`` for an unset one, a list as it is typed (``1,2,4``); descriptions keep their own
    line breaks."""

    def _get_help_string(self, action):
        h = action.help or ""
        if ("default" in h.lower() or action.default is argparse.SUPPRESS or action.nargs == 0
                or not action.option_strings or action.required):
            return h
        return (h + " " + _default_note(action)).strip()

    def _fill_text(self, text, width, indent):  # indented lines (tables) stay as written, others wrap
        return "\n".join(indent + part if part[:1].isspace() or not part.strip()
                         else argparse.HelpFormatter._fill_text(self, part, width, indent)
                         for part in text.split("\n"))


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` (and its sub-commands) print every option's default in ``--help``, options
    without a help text included."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
        elif (action.option_strings and not action.help and action.nargs != 0
              and action.default not in (None, argparse.SUPPRESS)):
            action.help = _default_note(action)
    return parser
