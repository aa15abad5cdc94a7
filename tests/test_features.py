"""The feature cache: embeddings written into the store with their identity, reused, refused or redone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ips_path.cli.main import cli
from ips_path.model import build_encoder
from ips_path.stores.features import embed_store, extract_features
from ips_path.stores.loader import PatchStreamer
from ips_path.stores.tile_store import TileStore, write_tile_store
from ips_path.synthetic.synth import write_synthetic_slide


@pytest.fixture()
def store(tmp_path) -> TileStore:
    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, 640, 512, mpp=0.5, downsamples=(1, 4), seed=5)
    xs, ys = np.arange(0, 640 - 63, 64), np.arange(0, 512 - 63, 64)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    return write_tile_store(tmp_path / "tiles" / "s.zarr", coords, np.ones(len(coords), np.float32),
                            np.ones((4, 4), np.uint8), 8.0,
                            {"slide_path": str(slide), "level0_mpp": [0.5, 0.5], "target_mpp": 0.5,
                             "patch_size": 64, "patch_size_level0": 64, "stride_level0": 64, "read_level": 0,
                             "read_size": 64})


def test_features_match_the_encoder_on_the_loaded_patches(store):
    torch.manual_seed(0)
    encoder = build_encoder("smallcnn").eval()
    with PatchStreamer(chunk_size=16) as streamer:
        cached = embed_store(encoder, store, streamer)
        with torch.no_grad():
            direct = torch.cat([encoder(c.patches) for c in streamer.stream(store)])
    assert cached.dtype == np.float16 and cached.shape == (store.n_patches, encoder.out_dim)
    np.testing.assert_allclose(cached.astype(np.float32), direct.numpy(), rtol=1e-2, atol=1e-2)


def test_extract_writes_reuses_and_refuses_other_weights_unless_overwrite(store, tmp_path):
    weights = tmp_path / "w.pt"
    torch.manual_seed(1)
    torch.save(build_encoder("smallcnn").state_dict(), weights)
    first = extract_features([store.path], "smallcnn", pretrained=weights, progress=False)
    assert [r.status for r in first] == ["done"]
    reopened = TileStore.open(store.path)
    cached = reopened.read_array("features/smallcnn")
    assert cached.shape[0] == store.n_patches
    attrs = reopened.array_attrs("features/smallcnn")
    assert attrs["encoder"] == "smallcnn" and attrs["identity"] == first[0].identity
    assert [r.status for r in extract_features([store.path], "smallcnn", pretrained=weights, progress=False)] \
        == ["reused"]
    # other weights under the same name: refused in one line, the cached features kept
    torch.save(build_encoder("smallcnn").state_dict(), tmp_path / "w2.pt")
    refused = extract_features([store.path], "smallcnn", pretrained=tmp_path / "w2.pt", progress=False)
    assert [r.status for r in refused] == ["refused"] and refused[0].exit_code == 2
    assert "weights_sha256" in refused[0].error and "--overwrite" in refused[0].error
    assert np.array_equal(TileStore.open(store.path).read_array("features/smallcnn"), cached)
    again = extract_features([store.path], "smallcnn", pretrained=tmp_path / "w2.pt", overwrite=True, progress=False)
    assert [r.status for r in again] == ["done"]
    assert not np.array_equal(TileStore.open(store.path).read_array("features/smallcnn"), cached)


def test_weights_rewritten_in_place_are_not_served_from_the_process_cache(store, tmp_path):
    weights = tmp_path / "w.pt"
    torch.manual_seed(1)
    torch.save(build_encoder("smallcnn").state_dict(), weights)
    extract_features([store.path], "smallcnn", pretrained=weights, progress=False)
    first = TileStore.open(store.path).read_array("features/smallcnn")
    torch.manual_seed(2)
    torch.save(build_encoder("smallcnn").state_dict(), weights)  # same path, other weights
    redone = extract_features([store.path], "smallcnn", pretrained=weights, overwrite=True, progress=False)
    assert [r.status for r in redone] == ["done"]
    second = TileStore.open(store.path).read_array("features/smallcnn")
    with PatchStreamer(chunk_size=16) as streamer:
        encoder = build_encoder("smallcnn", pretrained=weights).eval()
        expected = embed_store(encoder, TileStore.open(store.path), streamer)
    assert not np.array_equal(first, second) and np.array_equal(second, expected)


@pytest.mark.parametrize(("options", "message"), [
    (["--chunk-size", "0"], "--chunk-size 0"),
    (["--threads", "0"], "--threads 0"),
    (["--device", "tpu"], "is not a device"),
    (["--name", "../x"], "cannot name features"),
])
def test_each_bad_option_is_refused_in_one_line_before_any_store_is_touched(store, options, message, capsys):
    from ips_path.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["features", str(store.path), "--encoder", "smallcnn", *options])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not TileStore.open(store.path).array_names("features")


def test_cli_features_on_a_folder_and_a_bad_input(store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["features", str(store.path.parent), "--encoder", "smallcnn", "--device", "cpu"],
                           standalone_mode=False)
    assert result.exception is None, result.output
    assert "1 extracted" in result.output and result.return_value == 0
    assert TileStore.open(store.path).has_array("features/smallcnn")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(cli, ["features", str(empty)], standalone_mode=False)
    assert "no tile stores" in str(result.exception)
