"""``--help`` that shows every option's default: the formatter of the ``straightflow`` command and of
the benchmark suites' parsers (``benchmarks/harness.py`` imports it from here)."""
from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "show_defaults"]


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` with every option's default (unless its help already names it, it is None, or the
    option is a switch); descriptions keep their own line breaks."""

    def _get_help_string(self, action):
        h = action.help or ""
        if ("default" in h.lower() or action.default in (None, argparse.SUPPRESS) or action.nargs == 0
                or not action.option_strings):
            return h
        return h + " (default: %(default)s)"

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
            action.help = "(default: %(default)s)"
    return parser
