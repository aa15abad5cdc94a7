"""Per-slide stain normalisation: slides stained differently read alike; training, prediction and the
feature cache carry the choice."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from ips_path.cli.main import cli
from ips_path.runtime.errors import BadInputError
from ips_path.slides.stain import REFERENCE_OD, normalization_lut, optical_density, slide_stain_od
from ips_path.stores.features import extract_features
from ips_path.stores.loader import PatchStreamer
from ips_path.stores.tile_store import TileStore, write_tile_store
from ips_path.synthetic.synth import SlideSpec, write_synthetic_slide
from ips_path.training.checkpoint import load_model


def _tiled(tmp_path, name: str, width: int = 768, height: int = 512, **slide_options) -> tuple[SlideSpec, TileStore]:
    """A generated slide at 1 µm/px and its tile store on a 64 px grid (every patch, glass included)."""
    slide = tmp_path / f"{name}.svs"
    spec = write_synthetic_slide(slide, width, height, mpp=1.0, downsamples=(1, 4), tissue=1, lesions=1,
                                 nucleus_scale=1.4, **slide_options)
    xs, ys = np.arange(0, width - 63, 64), np.arange(0, height - 63, 64)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    store = write_tile_store(tmp_path / "tiles" / f"{name}.zarr", coords, np.ones(len(coords), np.float32),
                             np.ones((4, 4), np.uint8), 8.0,
                             {"slide_path": str(slide), "level0_mpp": [1.0, 1.0], "target_mpp": 1.0,
                              "patch_size": 64, "patch_size_level0": 64, "stride_level0": 64, "read_level": 0,
                              "read_size": 64})
    return spec, store


def _slide_store(tmp_path, name: str, stain_shift: float) -> TileStore:
    """The same tissue (seed 5), stained as ``stain_shift`` draws it."""
    return _tiled(tmp_path, name, seed=5, lesion_diameter_um=(60.0, 90.0), stain_shift=stain_shift)[1]


def _patches(store: TileStore, stain_norm: bool) -> torch.Tensor:
    with PatchStreamer(chunk_size=32, threads=2, stain_norm=stain_norm) as streamer:
        return torch.cat([c.patches for c in streamer.stream(store)])


def _tissue_od(patches: torch.Tensor) -> np.ndarray:
    return slide_stain_od(patches.permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def two_stainings(tmp_path_factory) -> tuple[TileStore, TileStore]:
    """One tissue, stained twice: as drawn by stain shift 0 and (another lab) by stain shift 0.4."""
    root = tmp_path_factory.mktemp("stain")
    return _slide_store(root, "plain", 0.0), _slide_store(root, "shifted", 0.4)


def test_one_tissue_stained_differently_reads_alike_after_normalisation(two_stainings):
    plain, shifted = two_stainings
    raw = (_patches(plain, False).float() - _patches(shifted, False).float()).abs().mean()
    normalised = (_patches(plain, True).float() - _patches(shifted, True).float()).abs().mean()
    ratio = _tissue_od(_patches(shifted, False)) / _tissue_od(_patches(plain, False))
    assert np.abs(np.log(ratio)).max() > 0.3, "the two stainings should differ before normalisation"
    assert normalised < raw / 3
    for store in two_stainings:  # and both now carry the reference staining
        np.testing.assert_allclose(_tissue_od(_patches(store, True)), REFERENCE_OD, rtol=0.1)


def test_normalisation_keeps_what_is_darker_within_a_slide(two_stainings):
    _, shifted = two_stainings
    raw, normalised = _patches(shifted, False), _patches(shifted, True)
    raw_order = np.argsort(optical_density(raw.permute(0, 2, 3, 1).numpy()).mean(axis=(1, 2, 3)))
    new_order = np.argsort(optical_density(normalised.permute(0, 2, 3, 1).numpy()).mean(axis=(1, 2, 3)))
    # a per-channel monotone map: the darkest and the palest patches stay where they were
    assert set(raw_order[-5:]) & set(new_order[-5:]) and set(raw_order[:5]) & set(new_order[:5])


def test_the_table_of_a_reference_slide_changes_nothing_and_glass_stays_glass():
    lut = normalization_lut(np.asarray(REFERENCE_OD))
    assert np.abs(lut.astype(int) - np.arange(256)[None]).max() <= 1
    darker = normalization_lut(np.asarray(REFERENCE_OD) * 2)  # a slide that took twice the stain
    assert (darker[:, 250:] == np.arange(250, 256)).all()  # brighter than glass: unchanged
    assert (darker[:, 100:240].astype(int) > np.arange(100, 240)).all()  # stained pixels get paler


def test_only_the_sampled_patches_decide_and_a_subset_stream_is_normalised_as_the_whole(two_stainings):
    _, shifted = two_stainings
    whole = _patches(shifted, True)
    with PatchStreamer(chunk_size=8, threads=1, stain_norm=True) as streamer:
        part = torch.cat([c.patches for c in streamer.stream(shifted, indices=[3, 1, 7])])
    assert torch.equal(part, whole[[3, 1, 7]])


def test_training_saves_the_choice_and_prediction_normalises_as_trained(cohort, tmp_path):
    manifest, shared_tiles = cohort
    tiles = shutil.copytree(shared_tiles, tmp_path / "tiles")  # predict writes scores into the stores
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--manifest", str(manifest), "--tiles", str(tiles), "-o", str(run),
                                      "--epochs", "1", "--n-select", "8", "--chunk-size", "32", "--dim", "32",
                                      "--heads", "2", "--threads", "2", "--device", "cpu", "--stain-norm"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run / "config.yaml").read_text())["stain_norm"] is True
    out = tmp_path / "pred"
    result = CliRunner().invoke(cli, ["predict", "--model", str(run), "--tiles", str(tiles), "--manifest",
                                      str(manifest), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with (out / "predictions.csv").open() as f:
        row = next(csv.DictReader(f))
    model, checkpoint = load_model(run / "best.pt" if (run / "best.pt").exists() else run / "last.pt")
    positive = f"prob_{checkpoint['class_names'][-1]}"
    store = TileStore.open(tiles / f"{row['slide_id']}.zarr")
    expected = {}
    for stain_norm in (True, False):
        with PatchStreamer(chunk_size=32, threads=2, stain_norm=stain_norm) as streamer, torch.no_grad():
            prediction = model.predict_slide(streamer.stream(store))
        expected[stain_norm] = float(prediction.probabilities["label"][-1])
    assert float(row[positive]) == pytest.approx(expected[True], abs=1e-4)
    assert expected[True] != pytest.approx(expected[False], abs=1e-6)  # the normalisation mattered


def test_features_with_stain_norm_are_another_identity_refused_under_the_same_name(two_stainings):
    _, shifted = two_stainings
    first = extract_features([shifted.path], "smallcnn", name="cnn", progress=False, stain_norm=True)
    assert first[0].status == "done" and first[0].identity["stain_norm"] is True
    again = extract_features([shifted.path], "smallcnn", name="cnn", progress=False, stain_norm=True)
    assert again[0].status == "reused"
    plain = extract_features([shifted.path], "smallcnn", name="cnn", progress=False)
    assert plain[0].status == "refused" and "stain_norm" in plain[0].error and "--overwrite" in plain[0].error


def test_stain_density_finds_the_lesion_of_a_stain_shifted_slide_by_its_darkest_nuclei(tmp_path):
    from ips_path.model import build_encoder
    from ips_path.stores.features import embed_store
    from ips_path.synthetic.synth import lesion_fractions

    spec, store = _tiled(tmp_path, "lesion", 1024, 768, seed=9, lesion_diameter_um=(50.0, 60.0), stain_shift=0.3)
    encoder = build_encoder("stain_density")
    assert encoder.out_dim == 9
    with PatchStreamer(chunk_size=64, threads=2, stain_norm=True) as streamer:
        density = embed_store(encoder, store, streamer).astype(np.float32)
    green_p99 = density[:, 5]
    in_lesion = lesion_fractions(spec, store.coords, store.patch_size_level0) > 0
    assert in_lesion.any() and in_lesion[int(np.argmax(green_p99))]
    # the median of a patch with tissue is above that of glass
    assert density[:, 4].max() > 0.1 and density[:, 4].min() < 0.05


def test_stain_density_is_refused_for_patches_that_are_not_rgb():
    from ips_path.model import build_encoder

    with pytest.raises(BadInputError, match="RGB"):
        build_encoder("stain_density")(torch.zeros((2, 1, 8, 8), dtype=torch.uint8))
    with pytest.raises(BadInputError, match="quantiles"):
        build_encoder("stain_density", quantiles=(0.5, 1.5))


def test_stain_density_features_are_stain_normalised_unless_told_otherwise_and_learned_ones_are_not(two_stainings,
                                                                                                    tmp_path):
    _, shifted = two_stainings
    store = TileStore.open(shutil.copytree(shifted.path, tmp_path / "shifted.zarr"))
    default = extract_features([store.path], "stain_density", progress=False)
    assert default[0].status == "done"
    assert default[0].identity["stain_norm"] is True and default[0].identity["window"] == 64
    result = CliRunner().invoke(cli, ["features", str(store.path), "--encoder", "stain_density", "--name", "raw",
                                      "--no-stain-norm", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "stain_norm" not in store.array_attrs("features/raw")["identity"]
    normalised, raw = (store.open_array(f"features/{n}")[:].astype(np.float32) for n in ("stain_density", "raw"))
    assert not np.allclose(normalised, raw, atol=1e-3)
    learned = extract_features([store.path], "smallcnn", progress=False)
    assert learned[0].status == "done" and "stain_norm" not in learned[0].identity
    # the window is part of what the features are: another one under the same name is refused
    small = extract_features([store.path], "stain_density", name="small", progress=False,
                             encoder_options={"window": 32})
    assert small[0].status == "done" and small[0].identity["window"] == 32
    again = extract_features([store.path], "stain_density", name="small", progress=False)
    assert again[0].status == "refused" and "window" in again[0].error


def test_stain_density_reads_the_darkest_window_so_a_small_dark_focus_counts_in_a_large_patch():
    from ips_path.model import build_encoder

    patch = torch.full((1, 3, 256, 256), 210, dtype=torch.uint8)  # light stroma
    patch[:, :, ::6, ::6] = 120  # ordinary nuclei everywhere: about 3 % of the pixels
    patch[:, :, 200:216, 8:24] = 40  # one hyperchromatic focus of 16 x 16 px: 0.4 % of the patch
    windowed, whole = build_encoder("stain_density"), build_encoder("stain_density", window=256)
    focus_window = patch[:, :, 192:256, 0:64]
    assert torch.equal(windowed(patch), windowed(focus_window))  # the focus's window speaks for the patch
    assert windowed(patch)[0, 2] > whole(patch)[0, 2] + 0.5  # red 99th percentile: the focus, not the nuclei
    assert torch.equal(windowed(patch[:, :, :64, :64]), whole(patch[:, :, :64, :64]))  # one window: as before
    with pytest.raises(BadInputError, match="window"):
        build_encoder("stain_density", window=0)
