"""``python -m qsdlearn``: the ``qsdlearn`` command (:func:`qsdlearn.cli.run`)."""

from .cli import run

if __name__ == "__main__":
    run()
