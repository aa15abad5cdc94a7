"""The streaming loader delivers exactly the slide's pixels, every patch once, in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ips_path.runtime.errors import IpspathError
from ips_path.slides.slide import Slide
from ips_path.stores.loader import Augmentation, PatchStreamer, augment_patches, grid_positions, resize_patches
from ips_path.stores.tile_store import TileStore, write_tile_store
from ips_path.synthetic.synth import write_synthetic_slide


def _store(folder: Path, slide_path: Path, coords: np.ndarray, *, patch_size: int, read_level: int,
           read_size: int, stride_level0: int, name: str = "s") -> TileStore:
    return write_tile_store(
        folder / f"{name}.zarr", coords, np.ones(len(coords), np.float32), np.ones((4, 4), np.uint8), 8.0,
        {"slide_path": str(slide_path), "level0_mpp": [0.5, 0.5], "target_mpp": 0.5, "patch_size": patch_size,
         "patch_size_level0": read_size * 4 ** read_level, "stride_level0": stride_level0,
         "read_level": read_level, "read_size": read_size})


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("loader") / "slide.svs"
    write_synthetic_slide(path, 1600, 1200, mpp=0.5, downsamples=(1, 4), tile_size=256, seed=3, lesions=1)
    return path


@pytest.fixture(scope="module")
def grid_store(slide_file, tmp_path_factory) -> TileStore:
    # A 96-px grid that does not line up with the 256-px JPEG tiles, some patches over the edge.
    xs, ys = np.arange(0, 1600, 96), np.arange(0, 1200, 96)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    return _store(tmp_path_factory.mktemp("stores"), slide_file, coords, patch_size=96, read_level=0,
                  read_size=96, stride_level0=96)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("threads,chunk_size", [(1, 7), (3, 16), (4, 64)])
def test_chunks_hold_exactly_the_slide_pixels_in_order(grid_store, slide_file, backend, threads, chunk_size):
    with PatchStreamer(chunk_size=chunk_size, threads=threads, backend=backend) as streamer:
        chunks = list(streamer.stream(grid_store))
    assert all(len(c) == chunk_size for c in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk_size
    patches = torch.cat([c.patches for c in chunks])
    positions = torch.cat([c.positions for c in chunks])
    assert patches.dtype == torch.uint8 and patches.shape == (grid_store.n_patches, 3, 96, 96)
    assert torch.equal(positions, grid_positions(grid_store.coords, 96))
    with Slide(slide_file, backend=backend) as slide:
        for i, (x, y) in enumerate(grid_store.coords):
            expected = slide.read_region((int(x), int(y)), 0, (96, 96))
            assert np.array_equal(patches[i].permute(1, 2, 0).numpy(), expected), (i, x, y)


def test_indices_select_patches_in_the_given_order(grid_store):
    picks = np.array([5, 0, 17, 3])
    with PatchStreamer(chunk_size=3, threads=2) as streamer:
        some = torch.cat([c.patches for c in streamer.stream(grid_store, indices=picks)])
        every = torch.cat([c.patches for c in streamer.stream(grid_store)])
    assert torch.equal(some, every[torch.as_tensor(picks)])


def test_read_level_patches_are_resized_to_the_patch_size(slide_file, tmp_path):
    coords = np.array([[0, 0], [256, 512], [1024, 768]])
    store = _store(tmp_path, slide_file, coords, patch_size=48, read_level=1, read_size=64, stride_level0=256)
    with PatchStreamer(chunk_size=2, threads=2) as streamer:
        patches = torch.cat([c.patches for c in streamer.stream(store)])
    assert patches.shape == (3, 3, 48, 48)
    with Slide(slide_file) as slide:
        raw = torch.stack([torch.from_numpy(slide.read_region((int(x), int(y)), 1, (64, 64))).permute(2, 0, 1)
                           for x, y in coords])
    assert torch.equal(patches, resize_patches(raw, 48))
    # and the resize is a faithful one: close to the mean colour of each patch
    assert (patches.float().mean((2, 3)) - raw.float().mean((2, 3))).abs().max() < 2


def test_a_corrupt_tile_names_slide_and_coordinates(test_data, tmp_path):
    bad = test_data / "bad" / "unreadable.svs"
    store = _store(tmp_path, bad, np.array([[0, 0], [256, 0]]), patch_size=64, read_level=0, read_size=64,
                   stride_level0=64)
    with PatchStreamer(chunk_size=2, threads=2) as streamer, pytest.raises(IpspathError) as err:
        list(streamer.stream(store))
    message = str(err.value)
    assert "unreadable.svs" in message and ("level-0 (0, 0)" in message or "level-0 (256, 0)" in message)


def test_empty_store_yields_nothing(slide_file, tmp_path):
    store = _store(tmp_path, slide_file, np.zeros((0, 2), np.int64), patch_size=64, read_level=0, read_size=64,
                   stride_level0=64)
    with PatchStreamer() as streamer:
        assert list(streamer.stream(store)) == []


def test_augmentation_is_seeded_and_geometric_parts_keep_the_pixels(grid_store):
    geometric = Augmentation(brightness=0, contrast=0, saturation=0)
    with PatchStreamer(chunk_size=32, augmentation=geometric, seed=1) as a, \
            PatchStreamer(chunk_size=32, augmentation=geometric, seed=1) as b, PatchStreamer(chunk_size=32) as plain:
        first, second, original = (torch.cat([c.patches for c in s.stream(grid_store)]) for s in (a, b, plain))
    assert torch.equal(first, second)
    assert not torch.equal(first, original)
    for aug, orig in zip(first, original, strict=True):
        variants = [torch.rot90(o, k, (-2, -1)) for o in (orig, orig.flip(-1)) for k in range(4)]
        assert any(torch.equal(aug, v) for v in variants)


def test_colour_jitter_changes_colours_within_bounds():
    patches = torch.full((64, 3, 8, 8), 128, dtype=torch.uint8)
    patches[:, 0] = 200
    generator = torch.Generator().manual_seed(0)
    out = augment_patches(patches, Augmentation(flips=False, rotations=False, brightness=0.2, contrast=0,
                                                saturation=0), generator)
    ratio = out[:, 1].float().mean((1, 2)) / 128
    assert out.dtype == torch.uint8
    assert ratio.min() >= 0.79 and ratio.max() <= 1.21 and ratio.std() > 0.05


def test_stream_features_reads_the_cached_embeddings(grid_store):
    features = np.random.default_rng(0).normal(size=(grid_store.n_patches, 12)).astype(np.float16)
    grid_store.write_array("features/test", features)
    with PatchStreamer(chunk_size=10) as streamer:
        chunks = list(streamer.stream_features(grid_store, "test"))
    assert np.array_equal(torch.cat([c.patches for c in chunks]).numpy(), features)
    assert torch.equal(torch.cat([c.positions for c in chunks]), grid_positions(grid_store.coords, 96))


def test_auto_reads_tiles_directly_only_where_tiffslide_sees_the_tiled_pyramid(small_svs, test_data, tmp_path):
    from ips_path.stores.loader import open_for_reading
    from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides

    slides = [small_svs.path, test_data / "slides" / "he_dicom.dcm"]
    tile_slides(collect_inputs(slides), tmp_path, TilingParams(target_mpp=2.0, patch_size=64, qc=False),
                progress=False)
    svs, dicom = TileStore.open(tmp_path / "small.zarr"), TileStore.open(tmp_path / "he_dicom.zarr")
    with open_for_reading(svs) as slide:
        assert slide.backend == "tifffile-tiles"
    with open_for_reading(dicom) as slide:  # tiffslide does not read DICOM
        assert slide.backend == "openslide"
    with open_for_reading(svs, backend="openslide") as slide:
        assert slide.backend == "openslide"
    moved = TileStore(svs.path, {**svs.attrs, "read_level_dimensions": [1, 1]}, svs.coords, svs.tissue_fraction)
    with open_for_reading(moved) as slide:  # another pyramid than the one tiled: the reference reader
        assert slide.backend == "openslide"


@pytest.mark.parametrize("level,size", [(0, 96), (1, 40)])
def test_tile_reader_pixels_equal_tiffslide_reads(slide_file, level, size):
    from ips_path.stores.loader import TiffTileReader

    rng = np.random.default_rng(level)
    locations = [(0, 0), (1600 - 30, 1200 - 30), (-40, 10), *rng.integers(0, 1500, size=(40, 2)).tolist()]
    with Slide(slide_file, backend="tiffslide") as slide, \
            TiffTileReader(slide_file, level, slide.level_downsamples[level]) as reader:
        for x, y in locations:  # unaligned, straddling tiles, over the edges
            assert np.array_equal(reader.read_region((x, y), level, (size, size)),
                                  slide.read_region((x, y), level, (size, size))), (x, y)


def test_tile_reader_names_the_slide_and_patch_of_a_corrupt_tile(test_data):
    from ips_path.stores.loader import TiffTileReader

    with TiffTileReader(test_data / "bad" / "unreadable.svs", 0, 1.0) as reader, \
            pytest.raises(IpspathError, match=r"unreadable\.svs: cannot read region at level-0 \(0, 0\).*Bogus marker"):
        reader.read_region((0, 0), 0, (16, 16))


def test_auto_loader_chunks_equal_the_slide_pixels_of_a_tiled_store(small_svs, tmp_path):
    from ips_path.tiling.run import TilingParams, collect_inputs, tile_slides

    tile_slides(collect_inputs([small_svs.path]), tmp_path, TilingParams(target_mpp=1.0, patch_size=100, qc=False),
                progress=False)
    store = TileStore.open(tmp_path / "small.zarr")
    with PatchStreamer(chunk_size=16, threads=3) as streamer:
        patches = torch.cat([c.patches for c in streamer.stream(store)])
    with Slide(small_svs.path, backend="tiffslide") as slide:
        for i in range(0, store.n_patches, 7):
            x, y = store.coords[i]
            raw = torch.from_numpy(slide.read_region((int(x), int(y)), store.read_level,
                                                     (store.read_size, store.read_size))).permute(2, 0, 1)
            assert torch.equal(patches[i], resize_patches(raw[None], store.patch_size)[0]), i


def test_rotations_alone_give_each_quarter_turn_and_nothing_else():
    patches = torch.arange(400 * 3 * 5 * 5, dtype=torch.int64).remainder(251).to(torch.uint8).view(400, 3, 5, 5)
    out = augment_patches(patches, Augmentation(flips=False, brightness=0, contrast=0, saturation=0),
                          torch.Generator().manual_seed(0))
    turns = []
    for aug, orig in zip(out, patches, strict=True):
        matches = [k for k in range(4) if torch.equal(aug, torch.rot90(orig, k, (-2, -1)))]
        assert len(matches) == 1
        turns.append(matches[0])
    counts = np.bincount(turns, minlength=4)
    assert counts.min() > 70  # about 100 each


class _WatchedReader:
    """A real slide reader that records reads running when it is closed, and reads started after."""

    def __init__(self, reader, delay_s: float):
        self.reader, self.delay_s = reader, delay_s
        self.backend = reader.backend
        self.lock = __import__("threading").Lock()
        self.running = self.started = 0
        self.running_at_close: int | None = None
        self.started_after_close = 0

    def read_region(self, location, level, size):
        with self.lock:
            self.running += 1
            self.started += 1
            if self.running_at_close is not None:
                self.started_after_close += 1
        try:
            __import__("time").sleep(self.delay_s)
            return self.reader.read_region(location, level, size)
        finally:
            with self.lock:
                self.running -= 1

    def close(self):
        with self.lock:
            self.running_at_close = self.running
        self.reader.close()


@pytest.fixture
def watched(monkeypatch):
    """Every slide the loader opens is a :class:`_WatchedReader` around the real one; the list of them."""
    import ips_path.stores.loader as loader

    opened = []
    real_open = loader.open_for_reading

    def open_watched(store, backend="auto", slide_mpp=None):
        opened.append(_WatchedReader(real_open(store, backend, slide_mpp), delay_s=0.02))
        return opened[-1]

    monkeypatch.setattr(loader, "open_for_reading", open_watched)
    return opened


@pytest.mark.parametrize("backend", ["auto", "openslide"])
def test_a_damaged_slide_stream_waits_for_its_running_reads_before_closing_the_slide(test_data, tmp_path, watched,
                                                                                     backend):
    bad = test_data / "bad" / "unreadable.svs"
    coords = np.stack(np.meshgrid(np.arange(0, 1024, 64), np.arange(0, 512, 64)), -1).reshape(-1, 2)
    store = _store(tmp_path, bad, coords, patch_size=64, read_level=0, read_size=64, stride_level0=64)
    with PatchStreamer(chunk_size=32, threads=4, backend=backend) as streamer, pytest.raises(IpspathError):
        list(streamer.stream(store))
    assert watched[0].running_at_close == 0
    assert watched[0].started_after_close == 0
    assert watched[0].started < len(coords)  # the queued reads of the other chunks were cancelled


def test_an_abandoned_stream_cancels_its_reads_before_closing_the_slide(grid_store, watched):
    with PatchStreamer(chunk_size=8, threads=3) as streamer:
        chunks = streamer.stream(grid_store)
        first = next(chunks)
        chunks.close()  # the consumer stops early, as a failed training step does
        assert len(first) == 8
        assert watched[0].running_at_close == 0
        assert watched[0].started_after_close == 0
        assert watched[0].started < grid_store.n_patches


def test_each_tile_is_decoded_once_by_all_threads_together(tmp_path):
    """256-px patches on 240-px tiles straddle up to four tiles; the shared cache decodes each once."""
    from ips_path.stores.loader import open_for_reading

    path = tmp_path / "aperio.svs"
    write_synthetic_slide(path, 2400, 1920, mpp=0.5, downsamples=(1, 4), tile_size=240, seed=4, tissue=1)
    xs, ys = np.arange(0, 2400 - 256, 256), np.arange(0, 1920 - 256, 256)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    store = _store(tmp_path, path, coords, patch_size=256, read_level=0, read_size=256, stride_level0=256)
    store.attrs["slide_dimensions"], store.attrs["read_level_dimensions"] = [2400, 1920], [2400, 1920]
    tiles = {(row, col) for x, y in coords for row in range(y // 240, (y + 255) // 240 + 1)
             for col in range(x // 240, (x + 255) // 240 + 1)}
    with open_for_reading(store) as reader, PatchStreamer(chunk_size=5, threads=4) as streamer:
        assert reader.backend == "tifffile-tiles"
        patches = torch.cat([c.patches for c in streamer.stream(store, slide=reader)])
        assert reader.decodes == len(tiles) < 2 * len(coords)
    with Slide(path, backend="tiffslide") as slide:
        for i, (x, y) in enumerate(coords):
            expected = slide.read_region((int(x), int(y)), 0, (256, 256))
            assert np.array_equal(patches[i].permute(1, 2, 0).numpy(), expected)


def test_reader_threads_default_to_the_cores_this_process_may_use():
    import os

    with PatchStreamer() as streamer:
        assert streamer.threads == len(os.sched_getaffinity(0))
