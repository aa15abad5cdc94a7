"""``ipspath demo``: generate a cohort, tile, train, predict, heatmaps and report, on a CPU in minutes."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("-o", "--out", "out_dir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the generated slides, tiles, run, predictions and report.")
@click.option("--seed", default=0, show_default=True, help="Seed of the generated cohort and of training.")
@click.pass_context
def demo_cmd(ctx: click.Context, out_dir: str, seed: int) -> int:
    """Show the whole chain on a generated cohort of H&E-like slides with small lesions.

    Generates training and held-out test slides, tiles them, trains an IPS model on the CPU,
    predicts the test slides with attention heatmaps and writes the review report. Takes a few
    minutes on a laptop; prints the test AUC and how often the most attended patch of a positive
    slide lies in a lesion.
    """
    from dataclasses import replace

    from ips_path.synthetic.demo import DemoSettings, run_demo

    settings = DemoSettings()
    settings = replace(settings, seed=seed, train=replace(settings.train, seed=seed))
    result = run_demo(out_dir, settings, progress=not ctx.obj["quiet"])
    total = sum(result.seconds.values())
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    auc = "n/a" if result.test_auc is None else f"{result.test_auc:.3f}"
    loc = "n/a" if result.localisation is None else f"{100 * result.localisation:.0f} %"
    click.echo(f"demo finished in {total:.0f} s ({steps})")
    click.echo(f"test AUC {auc}; most attended patch inside a lesion on {loc} of {result.n_positive_test} "
               "positive test slides")
    click.echo(f"open {result.report}")
    click.echo(f"  slides: {result.out_dir / 'slides'}   tiles + QC: {result.out_dir / 'tiles'}")
    click.echo(f"  model:  {result.out_dir / 'run'} (curves.png, metrics.csv)   "
               f"heatmaps: {result.out_dir / 'predictions' / 'heatmaps'}")
    return 0
