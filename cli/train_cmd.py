"""``ipspath train``: train an IPS slide classifier from a manifest and tile stores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ips_path.cli.options import OutputFolder
from ips_path.config import TrainConfig

_DEFAULTS = TrainConfig()


def _help(text: str, name: str) -> str:
    """Help text ending with the built-in default (options default to None so that YAML values show through)."""
    return f"{text} [default: {getattr(_DEFAULTS, name)}]"


@click.command("train")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="CSV with slide_id, slide_path, label and optional split (train/val/test), case_id, mpp.")
@click.option("--tiles", "tiles_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of tile stores <slide_id>.zarr made by `ipspath tile`.")
@click.option("-o", "--out", "out_dir", required=True, type=OutputFolder(),
              help="Run folder: config.yaml, splits.csv, metrics.csv, curves.png, last.pt, best.pt.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML file of settings (keys as the options below, e.g. n_select: 32); options given here "
                   "override it. With --resume, default: <out>/config.yaml.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from last.pt (an interrupted epoch is redone), exactly as if it had "
                   "not stopped. Only --device and --threads may change.")
@click.option("--folds", type=click.IntRange(min=2),
              help="K-fold cross-validation by patient, stratified by label: one run per fold in --out/fold_<i> "
                   "(the fold validates, the others train), splits.csv with each slide's fold, cv_summary.json and "
                   "a table of AUC, balanced accuracy and AUPRC per fold and mean +- sd (survival: folds "
                   "stratified by event and follow-up, Harrell's and Uno's C-index). Slides whose manifest "
                   "split is test stay out of every fold. --resume continues fold by fold.")
@click.option("--encoder", help=_help("Patch encoder: resnet18|resnet34|resnet50|smallcnn|timm:<name>. smallcnn "
                                      "suits a CPU; on a GPU use a ResNet, ideally with --pretrained.", "encoder"))
@click.option("--pretrained", type=click.Path(),
              help="Local weights file of the encoder (torchvision/timm state dict; a preset's file as its card "
                   "publishes it), or a Hugging Face preset's model folder. Nothing is downloaded.")
@click.option("--train-blocks", type=int, metavar="K",
              help="With a ViT preset encoder (uni_v1, uni2_h, virchow2, h_optimus_0/1, gigapath, phikon_v2): "
                   "fine-tune only its last K blocks, under activation checkpointing; the rest stays frozen.")
@click.option("--features", help="Train on cached embeddings features/<name> from `ipspath features` instead of "
                                 "pixels: epochs read no pixels (no augmentation; --encoder is ignored).")
@click.option("--feature-norm", type=click.Choice(["auto", "layer", "none"]),
              help=_help("With --features: start the projector with a LayerNorm over each patch's features (layer), "
                         "or keep their sizes (none; for a few handcrafted features, which a LayerNorm erases). "
                         "auto: none for stain_density features, layer for learned embeddings.", "feature_norm"))
@click.option("--n-select", type=int, help=_help("M: patches per slide kept for the gradient step.", "n_select"))
@click.option("--chunk-size", type=int,
              help=_help("I: patches encoded at a time while selecting; memory grows with M + I, not the slide.",
                         "chunk_size"))
@click.option("--dim", type=int, help=_help("Embedding size of the attention aggregator.", "dim"))
@click.option("--heads", type=int, help=_help("Attention heads (must divide --dim).", "heads"))
@click.option("--score", type=click.Choice(["logit", "paper"]),
              help=_help("Selection score: logit = exact top-M of the slide; paper = the IPS paper's softmax.",
                         "score"))
@click.option("--pos-encoding", type=click.Choice(["none", "1d", "2d"]),
              help=_help("Positional encoding: none, 1d (patch order, the paper) or 2d (grid position).",
                         "pos_encoding"))
@click.option("--epochs", type=int, help=_help("Epochs at most.", "epochs"))
@click.option("--batch-size", type=int, help=_help("Slides per optimiser step (per process under torchrun).",
                                                   "batch_size"))
@click.option("--lr", type=float, help=_help("Peak learning rate of AdamW.", "lr"))
@click.option("--weight-decay", type=float, help=_help("AdamW weight decay (weights, not biases/norms).",
                                                       "weight_decay"))
@click.option("--warmup-epochs", type=float,
              help=_help("Linear warm-up of the learning rate, then cosine decay to 0 (per step).", "warmup_epochs"))
@click.option("--grad-clip", type=float, help=_help("Largest gradient norm; 0: no clipping.", "grad_clip"))
@click.option("--class-weights/--no-class-weights", default=None,
              help=_help("Weight the loss of each class inversely to its share of training slides.", "class_weights"))
@click.option("--patience", type=int,
              help=_help("Stop after this many epochs without a better validation --monitor; 0: never.", "patience"))
@click.option("--monitor", type=click.Choice(["auc", "balanced_accuracy", "loss", "c_index", "pearson"]),
              help=_help("Validation metric for best.pt and early stopping (survival: c_index or loss; regression: "
                         "pearson or loss; auc means c_index, pearson there).", "monitor"))
@click.option("--augment/--no-augment", default=None,
              help=_help("Random flips, 90° rotations and colour jitter of training patches.", "augment"))
@click.option("--stain-norm/--no-stain-norm", default=None,
              help=_help("Bring each slide's staining to one reference (per-slide normalisation in optical "
                         "density) before the encoder; prediction does the same. For slides whose staining "
                         "varies (labs, stainers, days).", "stain_norm"))
@click.option("--threads", type=int, help=_help("Threads reading patches from the slide files.", "threads"))
@click.option("--device", help=_help("cpu, cuda, cuda:N, or auto (cuda when available; bf16 autocast on CUDA).",
                                     "device"))
@click.option("--seed", type=int, help=_help("Seed of initialisation, splits, order, augmentation; CPU runs repeat "
                                             "exactly.", "seed"))
@click.option("--val-fraction", type=float,
              help=_help("Share of patients per label for validation when the manifest has no split column.",
                         "val_fraction"))
@click.option("--checkpoint-grads/--no-checkpoint-grads", default=None,
              help=_help("Activation checkpointing of the gradient step (needs --grad-chunk-size): memory flat in M.",
                         "checkpoint_grads"))
@click.option("--grad-chunk-size", type=int,
              help="Re-encode the M selected patches with gradients in pieces of at most this many. [default: all]")
@click.option("--mpp", type=float, help="Patch resolution the run expects of the tile stores, µm/px. "
                                        "[default: the stores', which must agree]")
@click.option("--patch-size", type=int, help="Patch size the run expects of the tile stores, px. "
                                             "[default: the stores']")
@click.option("--task", type=click.Choice(["classification", "survival", "regression"]),
              help=_help("classification of the label column; survival: a risk score learnt from the time and "
                         "event columns (1 = event, 0 = censored); regression: a number, the one column "
                         "--label-columns names (standardised on the training slides).", "task"))
@click.option("--label-columns", metavar="COLUMNS",
              help=_help("Manifest columns to classify, comma-separated (e.g. grade,her2): one task each, with its own "
                         "query token and head over the column's sorted values. A slide with an empty cell counts for "
                         "nothing in that task's loss; the loss is the sum over the tasks; metrics are logged per task "
                         "and best.pt follows their mean --monitor; splits are stratified by the first column.",
                         "label_columns"))
@click.option("--regression-loss", type=click.Choice(["mse", "huber"]),
              help=_help("Regression: mean squared error or Huber loss (delta: one standard deviation of the "
                         "training targets).", "regression_loss"))
@click.option("--survival-loss", type=click.Choice(["cox", "nll"]),
              help=_help("Survival: cox = Cox partial likelihood over each batch (every batch holds an event); nll = "
                         "discrete-time likelihood over --time-bins bins (also predicts a survival curve).",
                         "survival_loss"))
@click.option("--time-bins", type=int, help=_help("Survival nll: time bins, cut at quantiles of the training event "
                                                  "times.", "time_bins"))
@click.option("--time-unit", help=_help("Survival: unit of the manifest's time column (for plots and reports).",
                                        "time_unit"))
@click.option("--risk-groups", type=click.IntRange(2, 3),
              help=_help("Survival: Kaplan-Meier risk groups at the median (2) or tertiles (3) of the training "
                         "risks.", "risk_groups"))
@click.option("--explore", type=float,
              help=_help("Share of M drawn at random from the rest of each training slide (0: greedy top-M, "
                         "the paper). It is what let IPS find lesions of ~0.1 % of the tissue where greedy "
                         "selection locked onto other patches; see the README.",
                         "explore"))
@click.option("--explore-mode", type=click.Choice(["uniform", "atypical"]),
              help=_help("How --explore draws its share: uniform, or atypical = the patches least like the rest "
                         "of their slide (farthest from its mean embedding), where micro-lesions are.",
                         "explore_mode"))
@click.option("--instance-loss", type=float,
              help=_help("Weight of an instance loss on the selection scores: top patches of positive slides "
                         "up, of negative slides down (0: off; two classes only).", "instance_loss"))
@click.option("--instance-k", type=int, help=_help("Patches per slide the instance loss labels at each end.",
                                                   "instance_k"))
@click.option("--label-case", type=click.Choice(["exact", "fold"]),
              help=_help("Labels that differ only in case ('Positive', 'positive'): exact refuses them (they would be "
                         "two classes); fold merges them into one class, spelled as most slides spell it.",
                         "label_case"))
@click.pass_context
def train_cmd(ctx: click.Context, manifest: Path, tiles_dir: Path, out_dir: Path, config_file: Path | None,
              resume: bool, folds: int | None, **options: Any) -> int:
    """Train a slide classifier with Iterative Patch Selection on the tile stores of a manifest's slides.

    \b
    Classes are the sorted labels (a softmax over them, also for two). Slides are split by the
    manifest's split column, or by patient with --seed/--val-fraction (saved as splits.csv); test
    slides are left alone. Each epoch logs loss, validation AUC (one-vs-rest macro for more than
    two classes), balanced accuracy and per-class recall to metrics.csv and curves.png.
    best.pt (best validation --monitor) is what `ipspath predict` uses.

    \b
    Several label columns (--label-columns grade,her2): one task per column; metrics.csv gets
    val_<task>_auc etc. per task and val_auc etc. as their mean; predict writes each task's
    predicted class and probabilities (prob_<task>=<class>) and metrics per task.

    \b
    Regression (--task regression --label-columns score): one numeric column, standardised on the
    training slides; each epoch logs the validation Pearson and Spearman r, MAE and R^2; predict
    writes the predicted number, regression_metrics.json (with 95 % intervals) and scatter.png.

    Survival (--task survival): the manifest needs time and event columns instead of label; the
    model learns a risk score (Cox, or a discrete-time survival curve with --survival-loss nll),
    splits keep events and follow-up balanced, each epoch logs the validation C-index, and the run
    ends with survival_metrics.json (Harrell's and Uno's C-index with 95 % intervals, time-dependent
    AUC) and km_val.png (Kaplan-Meier curves of the risk groups, log-rank p-value).

    \b
    Several GPUs or nodes: torchrun --nproc-per-node N -m ips_path.cli.main train ...
    (each process takes a disjoint share of the slides; gradients are averaged).

    \b
    Example (CPU, minutes):
      ipspath tile --manifest m.csv -o tiles --mpp 2 --patch-size 64
      ipspath train --manifest m.csv --tiles tiles -o run --epochs 10
      ipspath train --manifest m.csv --tiles tiles -o run --label-columns grade,her2
      ipspath train --manifest m.csv --tiles tiles -o run --task survival --time-unit months
      ipspath train --manifest m.csv --tiles tiles -o run --task regression --label-columns score
    """
    from ips_path.config import resolve_config
    from ips_path.training.train import train

    if config_file is None and resume and (out_dir / "config.yaml").is_file():
        config_file = out_dir / "config.yaml"
    config = resolve_config(config_file, options)
    if folds is not None:
        from ips_path.training.cross_validation import train_cross_validated

        cv = train_cross_validated(manifest, tiles_dir, out_dir, config, folds, resume=resume,
                                   progress=not ctx.obj["quiet"])
        shown = ", ".join(f"{name} {s['mean']:.3f} +- {s['sd']:.3f}" for name, s in cv.summary.items())
        click.echo(f"train: {folds}-fold cross-validation done; validation {shown} ({out_dir / 'cv_summary.json'})")
        return 0
    result = train(manifest, tiles_dir, out_dir, config, resume=resume, progress=not ctx.obj["quiet"])
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        best = (f"best validation {config.monitor} {result.best_metric:.4f} at epoch {result.best_epoch} "
                f"({out_dir / 'best.pt'})" if result.best_epoch else "no validation slides: no best.pt")
        click.echo(f"train: {result.status} after {result.epochs_completed} epoch(s); {best}")
    return 0
