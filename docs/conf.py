"""Sphinx configuration: ``nox -s docs`` builds the site into build/docs/
(ignored by git, outside docs/ so that linters skip it) with warnings as
errors and runs the doctest blocks.

The Markdown pages (the existing ones beside this file, the tutorial and
the how-to guides) go through myst-parser; the API reference is autodoc
with napoleon (Google style docstrings) and sphinxcontrib-trio, which marks
async functions and ``async with`` context managers as such.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import trio_bus

project = "trio_bus"
author = "trio_bus developers"
copyright = "trio_bus developers"  # noqa: A001 - Sphinx's name
release = trio_bus.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "sphinxcontrib_trio",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_inventories", "Thumbs.db", ".DS_Store"]

# Google style only; attrs classes document their fields under "Attributes".
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# attrs classes list their fields under "Attributes": no second, bare list.
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"members": True}

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"trio_bus {release}"


def _inventory(name: str, project: str) -> str:
    """Compile docs/_inventories/<name>.txt into an objects.inv for
    intersphinx to fall back on when the site is offline (CI sandboxes)."""
    lines = (Path(__file__).parent / "_inventories" / f"{name}.txt").read_text()
    out = Path(__file__).parent.parent / "build" / "docs" / "inventories" / f"{name}.inv"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n# Version: \n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    out.write_bytes(header.encode() + zlib.compress(lines.encode()))
    return str(out)


# The published inventory first; the compiled subset when it cannot be
# fetched (a failed first location is only logged when the second works).
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", (None, _inventory("python", "Python"))),
    "trio": ("https://trio.readthedocs.io/en/stable", (None, _inventory("trio", "Trio"))),
}
intersphinx_timeout = 5
