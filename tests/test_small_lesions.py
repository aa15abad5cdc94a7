"""Options for lesions far smaller than the slide: exploration during training selection, the instance
loss on the selection scores, and the trainer's report of how often it trained on lesions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ips_path.config import TrainConfig
from ips_path.model import IPSModel, PatchChunk, Task, build_encoder, train_step
from ips_path.runtime.errors import BadInputError

DIM = 8


def feature_model(n_select: int = 4, seed: int = 0) -> IPSModel:
    torch.manual_seed(seed)
    return IPSModel(build_encoder("features", in_features=DIM, out_dim=16), [Task("label", 2)], dim=16, n_heads=2,
                    n_select=n_select, chunk_size=8, dropout=0.0, attn_dropout=0.0)


def chunks(x: torch.Tensor, size: int = 8) -> list[PatchChunk]:
    return [PatchChunk(x[i:i + size]) for i in range(0, len(x), size)]


def test_explore_draws_a_share_of_m_outside_the_greedy_top_and_prediction_stays_greedy():
    model = feature_model(n_select=8)
    x = torch.randn(60, DIM, generator=torch.Generator().manual_seed(1))
    greedy = model.select_top_patches(chunks(x))
    all_scores = greedy.all_logits
    top8 = set(torch.topk(all_scores, 8).indices.tolist())
    assert set(greedy.indices.tolist()) == top8

    torch.manual_seed(3)
    explored = model.select_top_patches(chunks(x), explore=0.25)
    chosen = set(explored.indices.tolist())
    assert len(chosen) == 8
    assert set(torch.topk(all_scores, 6).indices.tolist()) <= chosen  # the best M - k are kept
    assert len(chosen - top8) == 2  # k = round(0.25 * 8) drawn from the rest
    torch.manual_seed(3)
    assert model.select_top_patches(chunks(x), explore=0.25).indices.tolist() == explored.indices.tolist()
    draws = set()
    for seed in range(10):
        torch.manual_seed(seed)
        draws |= set(model.select_top_patches(chunks(x), explore=0.25).indices.tolist()) - top8
    assert len(draws) > 8  # different draws reach different patches
    torch.manual_seed(0)
    everything = model.select_top_patches(chunks(x), explore=1.0)
    assert len(set(everything.indices.tolist())) == 8
    assert set(model.predict_slide(chunks(x)).selection.indices.tolist()) == top8
    with pytest.raises(BadInputError, match="explore"):
        model.select_top_patches(chunks(x), explore=1.5)


def _score_change(instance_loss: float, label: int) -> tuple[float, float]:
    """Change of the mean selection score of the 2 best and the 2 worst selected patches of one slide
    after five SGD steps on it."""
    model = feature_model(n_select=8)
    x = torch.randn(40, DIM, generator=torch.Generator().manual_seed(5))
    before = model.select_top_patches(chunks(x))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        train_step(model, [chunks(x)], {"label": torch.tensor([label])}, optimizer, instance_loss=instance_loss)
    after = model.select_top_patches(chunks(x)).all_logits
    best, worst = before.indices[:2], before.indices[-2:]
    return (float((after[best] - before.all_logits[best]).mean()),
            float((after[worst] - before.all_logits[worst]).mean()))


def test_the_instance_loss_ranks_down_the_best_of_negative_slides_and_spreads_positive_ones():
    # negative slide: whatever ranks highest there (look-alikes on real slides) is pushed down
    plain_best, _ = _score_change(0.0, label=0)
    instance_best, _ = _score_change(1.0, label=0)
    assert instance_best < plain_best - 0.05  # measured: -0.12 against -0.04
    # positive slide: its best patches are pushed up relative to its worst
    plain_best, plain_worst = _score_change(0.0, label=1)
    instance_best, instance_worst = _score_change(1.0, label=1)
    assert (instance_best - instance_worst) > (plain_best - plain_worst) + 0.01  # measured: 0.024 against 0.005


def test_the_instance_loss_needs_two_classes():
    model = IPSModel(build_encoder("features", in_features=DIM, out_dim=16), [Task("label", 3)], dim=16, n_heads=2,
                     n_select=4, chunk_size=8)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(BadInputError, match="two classes"):
        train_step(model, [chunks(torch.randn(10, DIM))], {"label": torch.tensor([1])}, optimizer, instance_loss=0.5)


@pytest.mark.parametrize(("values", "message"), [
    (dict(explore=1.5), "explore"), (dict(explore=float("nan")), "explore"),
    (dict(instance_loss=-1.0), "--instance-loss"), (dict(instance_loss=float("nan")), "--instance-loss"),
    (dict(instance_k=0), "--instance-k"),
])
def test_bad_small_lesion_options_are_refused(values, message):
    with pytest.raises(BadInputError, match=message):
        TrainConfig(**values)


def test_training_reports_how_often_it_trained_on_lesions_where_the_stores_know_them(cohort, tmp_path):
    import csv
    import shutil

    from ips_path.stores.tile_store import TileStore
    from ips_path.training.train import train

    manifest, tiles = cohort
    copy = tmp_path / "tiles"
    shutil.copytree(tiles, copy)
    config = TrainConfig(n_select=4, chunk_size=16, dim=16, heads=2, batch_size=2, epochs=1, threads=1,
                         device="cpu", val_fraction=0.0, explore=0.5)
    plain = train(manifest, copy, tmp_path / "plain", config, progress=False)
    assert "train_selected_in_lesion" not in plain.history[0]

    rows = list(csv.DictReader(manifest.open()))
    # every patch of the first positive slide is "lesion"; the second's truth holds no lesion, so it is
    # not counted: the one slide with lesions is found, and all its trained patches are in lesions
    positives = [r["slide_id"] for r in rows if r["label"] == "positive"][:2]
    for slide_id, value in zip(positives, (1.0, 0.0), strict=True):
        store = TileStore.open(copy / f"{slide_id}.zarr")
        store.write_array("truth/lesion", np.full(store.n_patches, value, dtype=np.float32))
    result = train(manifest, copy, tmp_path / "truth", config, progress=False)
    row = result.history[0]
    assert row["train_selected_in_lesion"] == 1.0
    assert row["train_lesion_found"] == 1.0
    assert (tmp_path / "truth" / "metrics.csv").read_text().count("train_selected_in_lesion") == 1


def _needle_bags(n_slides: int = 12, n_patches: int = 200, seed: int = 0
                 ) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """Feature bags where half the slides hold one "lesion" patch unlike the rest: the bags, their labels,
    the lesion indices. Patches vary in the first half of the dimensions, the lesion in the second (a
    direction, not only a size, so the encoder's LayerNorm keeps it)."""
    g = torch.Generator().manual_seed(seed)
    half = DIM // 2
    pattern = torch.cat((torch.zeros(half), torch.tensor([3.0, -3.0] * (half // 2))))
    spread = torch.cat((torch.ones(half), torch.full((half,), 0.1)))
    bags, labels, lesions = [], [], []
    for i in range(n_slides):
        x = torch.randn(n_patches, DIM, generator=g) * spread
        where = int(torch.randint(n_patches, (1,), generator=g))
        if i % 2:
            x[where] += pattern
        bags.append(x)
        labels.append(i % 2)
        lesions.append(where)
    return bags, labels, lesions


def test_atypical_exploration_draws_the_patch_least_like_its_slide_where_uniform_draws_miss_it():
    bags, labels, lesions = _needle_bags()
    model = feature_model(n_select=8)
    for x, label, lesion in zip(bags, labels, lesions, strict=True):
        if not label:
            continue
        atypical = model.select_top_patches(chunks(x, 32), explore=0.5, explore_mode="atypical")
        assert lesion in atypical.indices.tolist()
        assert len(set(atypical.indices.tolist())) == 8
        # the best M - k by score are kept as with uniform exploration
        assert set(torch.topk(atypical.all_logits, 4).indices.tolist()) <= set(atypical.indices.tolist())
        assert lesion not in model.predict_slide(chunks(x, 32)).selection.indices.tolist()  # prediction: greedy
    torch.manual_seed(0)
    uniform_hits = sum(lesion in model.select_top_patches(chunks(x, 32), explore=0.5).indices.tolist()
                       for x, label, lesion in zip(bags, labels, lesions, strict=True) if label)
    assert uniform_hits <= 2  # 4 draws of 200 patches: about 2 % per slide
    with pytest.raises(BadInputError, match="explore_mode"):
        model.select_top_patches(chunks(bags[0]), explore=0.5, explore_mode="attention")
    with pytest.raises(BadInputError, match="--explore-mode"):
        TrainConfig(explore_mode="attention")


def test_atypical_exploration_trains_every_positive_slide_on_its_needle_where_uniform_draws_almost_never_do():
    bags, labels, lesions = _needle_bags()
    results = {}
    for mode in ("uniform", "atypical"):
        model = feature_model(n_select=8)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = np.random.default_rng(0)
        torch.manual_seed(0)
        trained_on_lesion = []
        for _ in range(10):
            ids = g.choice(len(bags), 4, replace=False)
            targets = {"label": torch.tensor([labels[i] for i in ids])}
            out = train_step(model, [chunks(bags[i], 32) for i in ids], targets, optimizer, explore=0.5,
                             explore_mode=mode)
            trained_on_lesion += [lesions[i] in sel.tolist() for i, sel in zip(ids, out["selected"], strict=True)
                                  if labels[i]]
        results[mode] = float(np.mean(trained_on_lesion))
    assert results["atypical"] == 1.0  # while the weights change, the needle stays the slide's rarest patch
    assert results["uniform"] < 0.2  # measured: 0.01


def test_feature_norm_none_keeps_what_a_patch_says_through_the_size_of_its_features():
    from ips_path.training.checkpoint import build_model

    lesion_flag = torch.tensor([[0.0], [1.0]])  # one feature per patch: "this patch is a lesion"
    bright = torch.stack((torch.ones(DIM), 3 * torch.ones(DIM)))  # every feature higher on the second patch
    for norm, tells_apart in (("layer", False), ("none", True)):
        for x in (lesion_flag, bright):
            model = build_model(TrainConfig(features="cached", feature_norm=norm, dim=16, heads=2), 2,
                                in_features=x.shape[1]).eval()
            with torch.no_grad():
                first, second = model.embed(x)
            assert (not torch.allclose(first, second, atol=1e-4)) == tells_apart, (norm, x.shape)
    with pytest.raises(BadInputError, match="--feature-norm is for cached features"):
        TrainConfig(feature_norm="none")
    with pytest.raises(BadInputError, match="--feature-norm"):
        TrainConfig(features="cached", feature_norm="batch")


def test_feature_norm_auto_keeps_the_size_of_measured_features_and_normalises_learned_ones(cohort, tmp_path):
    import shutil

    import yaml

    from ips_path.stores.features import extract_features
    from ips_path.training.checkpoint import build_model, load_model
    from ips_path.training.train import train

    manifest, shared_tiles = cohort
    tiles = shutil.copytree(shared_tiles, tmp_path / "tiles")
    stores = sorted(tiles.glob("*.zarr"))
    assert all(o.ok for o in extract_features(stores, "stain_density", progress=False))
    assert all(o.ok for o in extract_features(stores, "smallcnn", progress=False))
    config = TrainConfig(n_select=4, chunk_size=16, dim=16, heads=2, batch_size=4, epochs=1, threads=1,
                         device="cpu")
    assert config.feature_norm == "auto"
    for features, chosen in (("stain_density", "none"), ("smallcnn", "layer")):
        run = tmp_path / features
        train(manifest, tiles, run, TrainConfig(**{**config.as_dict(), "features": features}), progress=False)
        assert yaml.safe_load((run / "config.yaml").read_text())["feature_norm"] == chosen
        model, _ = load_model(run / "last.pt")
        assert isinstance(model.encoder.norm, torch.nn.LayerNorm) == (chosen == "layer")
    # resuming with the default takes the run's choice; asking for the other one is a changed setting
    resumed = TrainConfig(**{**config.as_dict(), "features": "stain_density"})
    train(manifest, tiles, tmp_path / "stain_density", resumed, resume=True, progress=False)
    with pytest.raises(BadInputError, match="feature_norm"):
        train(manifest, tiles, tmp_path / "stain_density",
              TrainConfig(**{**resumed.as_dict(), "feature_norm": "layer"}), resume=True, progress=False)
    with pytest.raises(BadInputError, match="auto"):  # a model is never built on an unmade choice
        build_model(TrainConfig(features="cached"), 2, in_features=9)


def test_the_defaults_put_a_micro_lesion_on_top_where_the_defaults_of_before_did_not(tmp_path):
    """A small needle cohort tiled into 256 px patches (the default) at the slides' 1 µm/px: stain_density
    features and a training run with every default, against the defaults these had before."""
    import csv

    from ips_path.stores.features import extract_features
    from ips_path.stores.loader import PatchStreamer
    from ips_path.stores.tile_store import TileStore
    from ips_path.synthetic.synth import lesion_fractions, write_synthetic_cohort
    from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides
    from ips_path.training.checkpoint import load_model
    from ips_path.training.train import train

    specs = write_synthetic_cohort(tmp_path / "slides", 32, size=(2048, 1536), mpp=1.0, downsamples=(1, 4), seed=3,
                                   lesion_diameter_um=(40.0, 70.0), lesions_per_positive=(1, 2),
                                   lookalikes_per_slide=(2, 4), nucleus_scale=1.4, stain_shift=0.15, workers=2)
    manifest = tmp_path / "slides" / "manifest.csv"
    tiles = tmp_path / "tiles"
    tile_slides(collect_inputs([], manifest), tiles, TilingParams(target_mpp=1.0, patch_size=256, qc=False),
                progress=False)
    stores = sorted(tiles.glob("*.zarr"))
    test = {s.path.stem for s in specs[-16:]}
    rows = list(csv.DictReader(manifest.open()))
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, [*rows[0], "split"])
        writer.writeheader()
        writer.writerows({**r, "split": "test" if r["slide_id"] in test else "train"} for r in rows)

    assert all(o.ok for o in extract_features(stores, "stain_density", progress=False))
    assert all(o.ok for o in extract_features(stores, "stain_density", name="before", stain_norm=False,
                                              encoder_options={"window": 256}, progress=False))
    hits = {}
    for name, settings in (("now", {}), ("before", {"features": "before", "feature_norm": "layer", "explore": 0.0})):
        config = TrainConfig(**{"features": "stain_density", "threads": 1, "device": "cpu", **settings})
        train(manifest, tiles, tmp_path / name, config, progress=False)
        model, _ = load_model(tmp_path / name / "last.pt")
        found = []
        with PatchStreamer(threads=1) as streamer, torch.no_grad():
            for spec in specs:
                if spec.path.stem in test and spec.lesions:
                    store = TileStore.open(tiles / f"{spec.path.stem}.zarr")
                    selection = model.predict_slide(streamer.stream_features(store, config.features)).selection
                    top = store.coords[int(torch.argmax(selection.all_logits))][None]
                    found.append(bool(lesion_fractions(spec, top, store.patch_size_level0)[0] > 0))
        hits[name] = np.mean(found)
    assert hits["now"] >= 0.75 and hits["before"] <= 0.5, hits
