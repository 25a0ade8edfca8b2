"""MkDocs hook: publish a few Markdown files that live outside ``docs/`` and keep every link
written the GitHub way (relative to the file's place in the repository) working on the site.

The repository's own Markdown links are relative to the file that holds them: ``docs/calibration.md``
says ``../BENCHMARKS.md``, ``BENCHMARKS.md`` says ``docs/bench/solvers/solvers.md``. On the site those
files sit elsewhere (``BENCHMARKS.md`` at the site root, ``docs/`` *is* the root), so before MkDocs
resolves links this hook maps each relative link from its repository path to the page or file that
carries it on the site. A link to a repository file that the site does not carry is left as written,
and ``mkdocs build --strict`` fails on it: broken links are never hidden.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

# repository path -> path inside the site's docs tree
EXTRA_PAGES = {"BENCHMARKS.md": "BENCHMARKS.md", "research/RESULTS.md": "research/RESULTS.md"}
DOCS_PREFIX = "docs/"

# [text](target) and ![alt](target); the target ends at whitespace or ')'
_LINK = re.compile(r"(\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")


def _root(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def on_files(files, config):
    from mkdocs.structure.files import File  # imported here: the tests use map_link without mkdocs

    root = _root(config)
    for repo_path, site_path in EXTRA_PAGES.items():
        source = root / repo_path
        if not source.is_file():
            raise FileNotFoundError(f"docs/hooks/repo_pages.py: {repo_path} is listed in EXTRA_PAGES but missing")
        files.append(File.generated(config, site_path, abs_src_path=str(source)))
    return files


def _repo_path_of(src_uri: str) -> str:
    """Where the page with this site path lives in the repository."""
    for repo_path, site_path in EXTRA_PAGES.items():
        if site_path == src_uri:
            return repo_path
    return DOCS_PREFIX + src_uri


def _site_path_of(repo_path: str):
    """Where a repository file is on the site, or None when the site does not carry it."""
    if repo_path in EXTRA_PAGES:
        return EXTRA_PAGES[repo_path]
    if repo_path.startswith(DOCS_PREFIX):
        return repo_path[len(DOCS_PREFIX):]
    return None


def map_link(target: str, page_src_uri: str) -> str:
    """``target`` as written in the repository file of ``page_src_uri``, rewritten relative to the page's
    place on the site (unchanged when it is absolute, an anchor, or not carried by the site)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#|^/", target):
        return target
    path, sep, anchor = target.partition("#")
    if not path:
        return target
    here = posixpath.dirname(_repo_path_of(page_src_uri))
    repo_target = posixpath.normpath(posixpath.join(here, path))
    site_target = _site_path_of(repo_target)
    if site_target is None:
        return target
    rel = posixpath.relpath(site_target, posixpath.dirname(page_src_uri) or ".")
    return rel + sep + anchor


def on_page_markdown(markdown: str, page, config, files) -> str:
    src_uri = page.file.src_uri
    out, in_fence = [], False
    for line in markdown.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if not in_fence:
            line = _LINK.sub(lambda m: m.group(1) + map_link(m.group(2), src_uri) + m.group(3), line)
        out.append(line)
    return "".join(out)
