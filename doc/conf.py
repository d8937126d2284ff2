"""Sphinx configuration of the qsdlearn documentation (build: ``make -C doc html``)."""

import qsdlearn

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
numpydoc_show_class_members = False
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
}
exclude_patterns = ["_build"]
html_theme = "alabaster"
