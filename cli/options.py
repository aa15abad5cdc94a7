"""Options and parameter types that several commands share, spelled once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ips_path.runtime.errors import BadInputError
from ips_path.runtime.identity import VERIFY_MODES

__all__ = ["OutputFolder", "verify_option"]

#: ``--verify``: how a slide file is recognised as the one a result was made from (tile, predict).
verify_option = click.option(
    "--verify", type=click.Choice(VERIFY_MODES), default="fast", show_default=True,
    help="How slide files are recognised as the ones earlier results were made from. fast: size and a "
         "fingerprint of three 64 KiB blocks (start, middle, end), which finds a replaced file but not an edit "
         "in place that keeps the size elsewhere; full: also the SHA-256 of the whole file, read once per file "
         "(results made without it are made again).")


class OutputFolder(click.Path):
    """A folder the command writes into; an empty value is refused instead of meaning the current folder."""

    def __init__(self) -> None:
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            name = "/".join(param.opts) if param is not None else "the output folder"
            raise BadInputError(f"{name} is empty: give the output folder, e.g. {param.opts[0] if param else '-o'} "
                                "out (an empty value would write into the current folder)")
        return super().convert(value, param, ctx)
