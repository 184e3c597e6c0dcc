"""MkDocs hook: the docstrings' Sphinx roles (``:func:`name```, ``:meth:``, ``:class:``, ...) shown as the code they
mark, without the role's prefix (mkdocstrings renders the backquoted name as code and leaves the prefix as text)."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj):(?=<code>)")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    return ROLE.sub("", html)
