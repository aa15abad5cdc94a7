"""``ipspath features``: cache patch embeddings of a frozen encoder in the tile stores, or import those
of TRIDENT / CLAM / STAMP (``ipspath features import``)."""

from __future__ import annotations

from pathlib import Path

import click

from ips_path.cli.options import OutputFolder
from ips_path.stores.tile_store import find_stores


@click.command("extract")
@click.argument("tiles", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--encoder", default="resnet50", show_default=True,
              help="Frozen encoder: resnet18|resnet34|resnet50|smallcnn|timm:<name>, stain_density (optical-density "
                   "quantiles per channel, no weights; stain-normalised), or a foundation-model preset (see "
                   "`ipspath features --help`; presets need --pretrained).")
@click.option("--pretrained", type=click.Path(exists=True),
              help="Local weights file of the encoder (torchvision/timm state dict; a preset's file as its card "
                   "publishes it), or a Hugging Face preset's model folder. Nothing is downloaded.")
@click.option("--name", help="Name of the cached array features/<name> (default: the encoder name).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, or auto (cuda if available).")
@click.option("--chunk-size", default=128, show_default=True, help="Patches per forward pass.")
@click.option("--threads", type=int, default=None,
              help="Threads reading tiles from the slide files. Default: the CPU cores this process may use.")
@click.option("--stain-norm/--no-stain-norm", default=None,
              help="Bring each slide's staining to one reference (per-slide normalisation in optical density) before "
                   "the encoder.  [default: on for stain_density, whose numbers compare slides only on one staining; "
                   "off for learned encoders]")
@click.option("--overwrite", is_flag=True, help="Recompute cached features, and replace features of this name made by "
                                              "another encoder or other weights (otherwise refused).")
@click.option("--scheduler", metavar="ADDRESS", help="Dask scheduler address (tcp://host:8786), or local:N, to embed "
                                                     "slides on a cluster (GPU workers: --resources GPU=1).")
@click.pass_context
def extract_cmd(ctx: click.Context, tiles: tuple[str, ...], encoder: str, pretrained: str | None, name: str | None,
                 device: str, chunk_size: int, threads: int | None, stain_norm: bool | None, overwrite: bool,
                 scheduler: str | None) -> int:
    """Embed every patch of the tile stores TILES (stores or folders of them) once with a frozen encoder
    (what `ipspath features TILES...` runs).

    The embeddings go into each store as features/<name> (float16). Train on them with
    `ipspath train --features <name>`: epochs then read no pixels. Slides already done with the same
    encoder and weights are kept, so an interrupted run resumes where it stopped; features of that
    name from another encoder or other weights are refused unless --overwrite.
    """
    from ips_path.runtime.jobs import run_exit_code
    from ips_path.stores.features import extract_features

    outcomes = extract_features(find_stores(tiles), encoder, name=name, pretrained=pretrained, device=device,
                                chunk_size=chunk_size, threads=threads, overwrite=overwrite, scheduler=scheduler,
                                progress=not ctx.obj["quiet"], stain_norm=stain_norm)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "reused", "failed", "refused")}
    click.echo(f"features: {counts['done']} extracted, {counts['reused']} already there, {counts['failed']} failed"
               + (f", {counts['refused']} refused" if counts["refused"] else ""))
    for o in outcomes:
        if not o.ok:
            click.echo(f"  {o.status}: {o.error}", err=True)  # the error names the store
    return run_exit_code(outcomes)


@click.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--manifest", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="CSV with slide_id and slide_path (labels not needed); FOLDER holds <slide_id>.h5 of each.")
@click.option("-o", "--tiles", "tiles_dir", required=True, type=OutputFolder(),
              help="Folder of tile stores: made where missing, completed where present.")
@click.option("--format", "tool", type=click.Choice(["auto", "trident", "clam", "stamp"]), default="auto",
              show_default=True, help="Tool that wrote the files (auto: recognised from their contents).")
@click.option("--name", help="Name of the features: features/<name>, for `train --features <name>` "
                             "(default: the encoder the files name; CLAM files name none).")
@click.option("--clam-patches", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="CLAM's patches/ folder (create_patches_fp.py), for the patch size and level its feature files "
                   "do not record.")
@click.option("--overwrite", is_flag=True, help="Replace features of that name made from other inputs.")
@click.pass_context
def import_cmd(ctx: click.Context, folder: Path, manifest: Path, tiles_dir: Path, tool: str, name: str | None,
               clam_patches: Path | None, overwrite: bool) -> int:
    """Import the patch features TRIDENT, CLAM or STAMP made, one FOLDER/<slide_id>.h5 per manifest slide.

    \b
    TRIDENT  features_<encoder>/<slide>.h5: features (N, D), coords level-0 px, patch size attrs
    CLAM     h5_files/<slide>.h5: features, coords level-0 px (patch size: --clam-patches)
    STAMP    <slide>.h5: feats, coords in µm, tile_size_um / tile_size_px attrs

    Each slide's tile store gets the features as features/<name> (float16) with their provenance;
    a slide without a store gets one (the file's patch grid and a tissue mask). All files are checked
    first: coordinates that disagree with an existing store (another grid, slide or resolution) stop
    the import with nothing written. Then:

    \b
      ipspath train --manifest m.csv --tiles TILES --features <name> -o run
      ipspath predict --model run --manifest m.csv --tiles TILES -o pred
    """
    from ips_path.runtime.jobs import run_exit_code
    from ips_path.stores.feature_import import import_features

    outcomes = import_features(folder, manifest, tiles_dir, tool=tool, name=name, clam_patches=clam_patches,
                               overwrite=overwrite, progress=not ctx.obj["quiet"])
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "reused", "failed")}
    click.echo(f"import: {counts['done']} imported, {counts['reused']} already there, {counts['failed']} failed")
    for o in outcomes:
        if not o.ok:
            click.echo(f"  failed: {o.slide_id}: {o.error}", err=True)
    return run_exit_code(outcomes)


class _ExtractByDefault(click.Group):
    """``ipspath features TILES...`` runs ``extract``; ``ipspath features import ...`` imports."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["extract", *args]
        return super().parse_args(ctx, args)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # the preset table needs torch: built only for --help, so `features import` does not import it
        from ips_path.model.presets import preset_table

        formatter.write_paragraph()
        formatter.write_text("Foundation-model presets for --encoder: weights from a local file (--pretrained, the "
                             "file its model card publishes), the tiles it was trained on, and its input (resized "
                             "and cropped on the device as its card does). The extra 'foundation' is needed except "
                             "by resnet50_trunc. Tiles of another size or µm/px work, resized; `features` says so:")
        formatter.write_paragraph()
        for line in preset_table().splitlines():
            formatter.write(f"{'':>{formatter.current_indent}}  {line}\n")


@click.group("features", cls=_ExtractByDefault)
def features_cmd() -> None:
    """Patch embeddings in the tile stores: compute them with a frozen encoder, or import them.

    \b
      ipspath features TILES... --encoder uni_v1 --pretrained uni.bin     (= features extract)
      ipspath features import FEATURE_FOLDER --manifest m.csv -o TILES
    """


features_cmd.add_command(extract_cmd)
features_cmd.add_command(import_cmd)
