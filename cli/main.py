"""Entry point of the ``ipspath`` command.

Sub-commands live in their own modules and are imported only when invoked, so that
``ipspath tile`` never pays for importing torch.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback

import click

from ips_path.runtime.errors import IpspathError
from ips_path.runtime.jobs import error_line

# name -> "module:attribute" of the click command; imported on first use.
COMMANDS = {
    "demo": "ips_path.cli.demo_cmd:demo_cmd",
    "features": "ips_path.cli.features_cmd:features_cmd",
    "heatmap": "ips_path.cli.heatmap_cmd:heatmap_cmd",
    "inspect": "ips_path.cli.inspect_cmd:inspect_cmd",
    "predict": "ips_path.cli.predict_cmd:predict_cmd",
    "pretrain": "ips_path.cli.pretrain_cmd:pretrain_cmd",
    "report": "ips_path.cli.report_cmd:report_cmd",
    "synth": "ips_path.cli.synth_cmd:synth_cmd",
    "tile": "ips_path.cli.tile_cmd:tile_cmd",
    "train": "ips_path.cli.train_cmd:train_cmd",
    "view": "ips_path.cli.view_cmd:view_cmd",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported when first needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ipspath")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logging of ipspath.")
@click.option("--debug-all", is_flag=True,
              help="With --debug: debug logging of every library too (zarr, numcodecs, matplotlib, PIL, dask, ...).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, debug_all: bool, quiet: bool) -> None:
    """ipspath: train slide-level classifiers on whole-slide images with Iterative Patch Selection.

    \b
    Typical flow:
      ipspath tile SLIDES... -o tiles/        tissue masks + patch coordinates
      ipspath train --manifest m.csv --tiles tiles/ -o run/
      ipspath predict --model run/ SLIDES... -o pred/
    """
    level = logging.DEBUG if debug or debug_all else logging.WARNING if quiet else logging.INFO
    handler = _CommandHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    if not debug_all:
        handler.addFilter(_OwnRecordsAt(level))
    # A process may run several commands (tests, notebooks): replace the handler an earlier one added, and
    # leave every other handler (pytest's, an application's) alone.
    root = logging.getLogger()
    for earlier in [h for h in root.handlers if isinstance(h, _CommandHandler)]:
        root.removeHandler(earlier)
    root.addHandler(handler)
    root.setLevel(level)
    ctx.obj = {"debug": debug or debug_all, "quiet": quiet}


class _CommandHandler(logging.StreamHandler):
    """The handler one command adds to the root logger (to stderr, as it is when the command starts)."""


class _OwnRecordsAt(logging.Filter):
    """Passes ipspath's records from ``level`` up and other libraries' from WARNING up.

    A filter on the one handler, not levels set on other libraries' loggers, so the choice holds for
    loggers made after this and leaves no state behind in a process that runs several commands.
    """

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == "ips_path" or record.name.startswith("ips_path.")
        return record.levelno >= (self.level if own else max(self.level, logging.WARNING))


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors become one line and an exit code, not a traceback.

    With ``--debug`` the traceback is printed first; the line and the exit code stay the same
    (2 for bad input, 1 for failures).
    """
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or "--debug-all" in args
    try:
        rv = cli.main(args=args, prog_name="ipspath", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("ipspath: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("ipspath: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last line of defence for users
        if debug:
            traceback.print_exc()
        line, code = error_line(exc)
        if isinstance(exc, IpspathError) or code == 2:
            click.echo(f"ipspath: error: {line}", err=True)
        else:  # error_line's "internal error: ..." line
            click.echo(f"ipspath: {line}", err=True)
        sys.exit(code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
