"""``ipspath pretrain``: learn a patch encoder without labels from the patches of tile stores."""

from __future__ import annotations

from pathlib import Path

import click

from ips_path.training.pretrain import PretrainConfig, pretrain

_DEFAULTS = PretrainConfig()


def _help(text: str, name: str) -> str:
    return f"{text} [default: {getattr(_DEFAULTS, name)}]"


@click.command("pretrain")
@click.option("--tiles", "tiles", required=True, multiple=True, type=click.Path(exists=True),
              help="Tile stores (.zarr) or folders of them, all of one resolution and patch size (repeatable).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: encoder.pt (the weights), metrics.csv, curves.png, last.pt.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from last.pt (an interrupted epoch is "
                                             "redone). Only --device and --threads may change.")
@click.option("--encoder", default=_DEFAULTS.encoder,
              help=_help("Pixel encoder: smallcnn|resnet18|resnet34|resnet50|timm:<name>, or a ViT preset with "
                         "--pretrained as its starting point.", "encoder"))
@click.option("--method", default=_DEFAULTS.method,
              help=_help("Self-supervised objective: byol (online/target networks, the IPS paper's choice; its "
                         "features told lesions from look-alikes best, docs/pretrain.md) or simclr (contrastive, "
                         "one network, cheapest per step).", "method"))
@click.option("--epochs", type=int, default=_DEFAULTS.epochs, help=_help("Epochs.", "epochs"))
@click.option("--patches-per-epoch", type=int, default=_DEFAULTS.patches_per_epoch,
              help=_help("Patches drawn afresh per epoch (per process), uniformly over all patches.",
                         "patches_per_epoch"))
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, help=_help("Patches per step.", "batch_size"))
@click.option("--lr", type=float, default=_DEFAULTS.lr, help=_help("Peak AdamW learning rate.", "lr"))
@click.option("--crop", type=int, default=None,
              help="Side of the random crops in px, at the stores' resolution (never rescaled). [default: 3/4 of "
                   "the patch size]")
@click.option("--hed", type=float, default=_DEFAULTS.hed,
              help=_help("Haematoxylin/eosin jitter: stain densities scaled by 1 +- this.", "hed"))
@click.option("--blur", type=float, default=_DEFAULTS.blur, help=_help("Probability of a Gaussian blur.", "blur"))
@click.option("--stain-norm/--no-stain-norm", default=_DEFAULTS.stain_norm,
              help=_help("Normalise each slide's staining first (then give `features --stain-norm` too).",
                         "stain_norm"))
@click.option("--pretrained", type=click.Path(exists=True, dir_okay=False),
              help="Starting weights of the encoder (local file; needed for presets).")
@click.option("--train-blocks", type=int, metavar="K", help="With a ViT preset: train only its last K blocks.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, help=_help("Seed.", "seed"))
@click.option("--device", default=_DEFAULTS.device, help=_help("cpu, cuda, cuda:N or auto.", "device"))
@click.option("--threads", type=int, default=_DEFAULTS.threads, help=_help("Reader threads.", "threads"))
@click.pass_context
def pretrain_cmd(ctx: click.Context, tiles: tuple[str, ...], out_dir: Path, resume: bool, **settings: object) -> None:
    """Train an encoder by self-supervision on patches sampled across the tile stores TILES.

    The weights (OUT/encoder.pt) load unchanged in `ipspath features --encoder ARCH --pretrained
    OUT/encoder.pt` and `ipspath train --encoder ARCH --pretrained OUT/encoder.pt`. Under torchrun
    every process trains on its own patches. A killed run continues with --resume.
    """
    result = pretrain(list(tiles), out_dir, PretrainConfig(**settings), resume=resume,
                      progress=not ctx.obj["quiet"])
    last = result.history[-1] if result.history else {}
    click.echo(f"pretrain: {result.epochs_completed} epochs, final loss {last.get('train_loss', float('nan')):.4f}; "
               f"weights {result.weights}")
