"""Parameter types shared by the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ips_path.errors import BadInputError

__all__ = ["OutputFolder"]


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
