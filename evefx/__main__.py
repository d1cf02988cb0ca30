"""``python -m evefx``: the ``evefx`` command without the console script on PATH.

Example:
    $ python -m evefx validate examples/specs/*.yaml
"""
from evefx.cli import app

app(prog_name="evefx")
