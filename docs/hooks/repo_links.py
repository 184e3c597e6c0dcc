"""MkDocs hook: the site's pages may include a file of the repository and link to files outside ``docs/``.

- ``<!-- include: PATH -->`` (a path from the repository root) is replaced by that file's text, so the front page
  (README.md), CONTRIBUTING.md and CHANGELOG.md are written once and shown on GitHub and in the site alike.
- A relative link is resolved from the file it was written in (the page, or the included file). A target inside
  ``docs/`` becomes a link relative to the page; a file included as a page (README.md -> index.md) becomes a link
  to that page; any other file of the repository becomes a link to it on ``repo_url`` when mkdocs.yml sets one,
  else its path as code. A target that does not exist is left alone, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import os
import re
from typing import Any

INCLUDE = re.compile(r"<!-- include: (?P<path>[^ ]+) -->")
# [text](target) outside code; targets without a scheme, not an anchor alone, not absolute
LINK = re.compile(r"(?P<open>!?\[[^\]]*\]\()(?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?(?P<close>\))")
FENCE = re.compile(r"^(```|~~~)")
# Figures that results pages name but that were never committed (docs/results is kept as it was written): the link
# becomes its text, so that every other missing target still fails the build.
NOT_COMMITTED = {
    f"docs/results/{task}/base-plans/analysis/{figure}.png"
    for task in ("text-classification", "image-classification")
    for figure in (
        "spectrum_prior",
        "energy_curve_prior",
        "spectrum_full_finetune",
        "energy_curve_full_finetune",
    )
}


def _root(config: Any) -> str:
    return os.path.dirname(os.path.abspath(config["config_file_path"]))


def _included_pages(root: str, docs_dir: str) -> dict[str, str]:
    """Repository path of each file a page includes -> that page's path inside docs/."""
    pages = {}
    for folder, _, names in os.walk(docs_dir):
        for name in names:
            if name.endswith(".md"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    for match in INCLUDE.finditer(f.read()):
                        pages[os.path.normpath(match["path"])] = os.path.relpath(path, docs_dir)
    return pages


def _rewrite(text: str, written_in: str, page: str, root: str, docs_rel: str, config: Any) -> str:
    """The links of ``text`` (written in the repository file ``written_in``) as seen from the site page ``page``."""
    pages = _included_pages(root, os.path.join(root, docs_rel))
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def link(match: re.Match) -> str:
        target = match["target"]
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("/"):
            return match[0]
        resolved = os.path.normpath(os.path.join(os.path.dirname(written_in), target))
        if resolved.startswith(".."):
            return match[0]
        anchor = match["anchor"] or ""
        if resolved in NOT_COMMITTED:
            text = match["open"].lstrip("!")[1:-2]
            return f"{text} (figure not committed: `{resolved}`)"
        inside = resolved == docs_rel or resolved.startswith(docs_rel + os.sep)
        if inside or resolved in pages:
            in_docs = os.path.relpath(resolved, docs_rel) if inside else pages[resolved]
            new = os.path.relpath(in_docs, os.path.dirname(page) or ".")
            return f"{match['open']}{new}{anchor}{match['close']}"
        if not os.path.exists(os.path.join(root, resolved)):
            return match[0]  # broken: left for MkDocs to report
        if repo_url:
            return f"{match['open']}{repo_url}/blob/main/{resolved}{anchor}{match['close']}"
        label = match["open"][1:-2] if not match["open"].startswith("!") else resolved
        return label if label.startswith("`") else f"{label} (`{resolved}`)"

    out, fenced = [], False
    for line in text.split("\n"):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        out.append(line if fenced else LINK.sub(link, line))
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    root = _root(config)
    docs_rel = os.path.relpath(config["docs_dir"], root)
    page_path = page.file.src_uri
    written_in = os.path.join(docs_rel, page_path)

    def include(match: re.Match) -> str:
        path = os.path.normpath(match["path"])
        with open(os.path.join(root, path), encoding="utf-8") as f:
            return _rewrite(f.read(), path, page_path, root, docs_rel, config)

    parts = INCLUDE.split(markdown)
    if len(parts) == 1:
        return _rewrite(markdown, written_in, page_path, root, docs_rel, config)
    # INCLUDE.split alternates text and captured paths
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(include(re.match(r"(?P<path>.*)", part)))
        else:
            out.append(_rewrite(part, written_in, page_path, root, docs_rel, config))
    return "".join(out)
