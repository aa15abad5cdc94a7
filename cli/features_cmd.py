"""``ipspath features``: cache patch embeddings of a frozen encoder in the tile stores."""

from __future__ import annotations

from pathlib import Path

import click

from ips_path.errors import BadInputError


def _find_stores(inputs: tuple[str, ...]) -> list[Path]:
    stores: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.suffix == ".zarr":
            stores.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.glob("*.zarr") if p.is_dir())
            if not found:
                raise BadInputError(f"{path}: no tile stores (*.zarr) in this folder; run `ipspath tile` first")
            stores.extend(found)
        else:
            raise BadInputError(f"{path}: not a tile store (.zarr) or a folder of them")
    return stores


@click.command("features")
@click.argument("tiles", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--encoder", default="resnet50", show_default=True,
              help="Frozen encoder: resnet18|resnet34|resnet50|smallcnn|timm:<name>.")
@click.option("--pretrained", type=click.Path(exists=True, dir_okay=False),
              help="Local weights file of the encoder (torchvision/timm state dict). Nothing is downloaded.")
@click.option("--name", help="Name of the cached array features/<name> (default: the encoder name).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, or auto (cuda if available).")
@click.option("--chunk-size", default=128, show_default=True, help="Patches per forward pass.")
@click.option("--threads", default=4, show_default=True, help="Threads reading tiles from the slide files.")
@click.option("--overwrite", is_flag=True, help="Recompute features that are already cached.")
@click.option("--scheduler", metavar="ADDRESS", help="Dask scheduler address (tcp://host:8786), or local:N, to embed "
                                                     "slides on a cluster (GPU workers: --resources GPU=1).")
@click.pass_context
def features_cmd(ctx: click.Context, tiles: tuple[str, ...], encoder: str, pretrained: str | None, name: str | None,
                 device: str, chunk_size: int, threads: int, overwrite: bool, scheduler: str | None) -> int:
    """Embed every patch of the tile stores TILES (stores or folders of them) once with a frozen encoder.

    The embeddings go into each store as features/<name> (float16). Train on them with
    `ipspath train --features <name>`: epochs then read no pixels. Slides already done are skipped,
    so an interrupted run resumes where it stopped.
    """
    import torch

    from ips_path.features import extract_features

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    results = extract_features(_find_stores(tiles), encoder, name=name, pretrained=pretrained, device=device,
                               chunk_size=chunk_size, threads=threads, overwrite=overwrite, scheduler=scheduler,
                               progress=not ctx.obj["quiet"])
    counts = {s: sum(r.status == s for r in results) for s in ("extracted", "skipped", "failed")}
    click.echo(f"features: {counts['extracted']} extracted, {counts['skipped']} skipped, {counts['failed']} failed")
    for r in results:
        if r.status == "failed":
            click.echo(f"  failed: {r.store}: {r.error}", err=True)
    return 1 if counts["failed"] else 0
