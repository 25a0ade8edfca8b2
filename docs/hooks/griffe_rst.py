"""Griffe extension for the API reference: the library's docstrings are written with reStructuredText
roles (``:func:`calibrate```, ``:class:`~straightflow.recipe.Recipe```) and literal blocks introduced
by ``::``. Markdown has neither, so each role becomes a code span holding the name (a leading ``~``
keeps only the last component, as Sphinx does) and ``::`` ending a paragraph becomes ``:`` before
the indented block, which Markdown already shows as code. The docstrings themselves are not edited.
"""
from __future__ import annotations

import re

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const|ref|term):`([^`]+)`")
LITERAL_INTRO = re.compile(r"(\S)\s*::[ \t]*$", re.MULTILINE)  # "text::" at the end of a line
BARE_LITERAL = re.compile(r"^([ \t]*)::[ \t]*$", re.MULTILINE)  # "::" alone on its line


def _role(match: re.Match) -> str:
    target = match.group(1).strip()
    label = re.match(r"^(.*?)\s*<([^>]+)>$", target)  # :func:`text <target>`
    if label:
        return f"`{label.group(1)}`"
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target}`"


def rst_to_markdown(text: str) -> str:
    """The docstring ``text`` with reST roles as code spans and ``::`` literal-block markers as ``:``."""
    text = ROLE.sub(_role, text)
    text = LITERAL_INTRO.sub(r"\1:", text)
    return BARE_LITERAL.sub("", text)


try:
    from griffe import Extension
except ImportError:  # the docs extra is not installed: only rst_to_markdown is used (by the tests)
    Extension = object


class RstRoles(Extension):
    """Rewrite every docstring once, when griffe loads the object."""

    def on_instance(self, **kwargs) -> None:
        obj = kwargs.get("obj")
        if obj is not None and getattr(obj, "docstring", None) is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
