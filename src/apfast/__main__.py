"""``python -m apfast``: the command line (:func:`apfast.run.cli.run`)."""

from apfast.run.cli import run

run()
