"""Sphinx configuration of the qsdlearn documentation (build: ``make -C doc html``)."""

import os

import qsdlearn
from qsdlearn.cli import build_parser

project = "qsdlearn"
author = "qsdlearn developers"
release = qsdlearn.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]
autosummary_generate = True
# classes list their public methods and properties with their whole docstrings
templates_path = ["_templates"]
numpydoc_show_class_members = False
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
}
exclude_patterns = ["_build"]
html_theme = "alabaster"


def _write_cli_help():
    """The ``--help`` of the command and of each subcommand, for ``cli.rst``."""
    parser = build_parser()
    texts = [parser.format_help()]
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        texts.append(f"$ qsdlearn {name} --help\n" + sub.format_help())
    os.makedirs("generated", exist_ok=True)
    with open(os.path.join("generated", "cli_help.txt"), "w") as file:
        file.write("$ qsdlearn --help\n" + "\n".join(texts))


_write_cli_help()
