"""Options that several commands share, spelled once."""

from __future__ import annotations

import click

from ips_path.runtime.identity import VERIFY_MODES

#: ``--verify``: how a slide file is recognised as the one a result was made from (tile, predict).
verify_option = click.option(
    "--verify", type=click.Choice(VERIFY_MODES), default="fast", show_default=True,
    help="How slide files are recognised as the ones earlier results were made from. fast: size and a "
         "fingerprint of three 64 KiB blocks (start, middle, end), which finds a replaced file but not an edit "
         "in place that keeps the size elsewhere; full: also the SHA-256 of the whole file, read once per file "
         "(results made without it are made again).")
