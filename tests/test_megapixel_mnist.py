"""Megapixel MNIST generator: shapes, determinism, the digits of every image, targets, disjoint pools."""

from __future__ import annotations

import os
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_test_data

from ips_path.runtime.errors import BadInputError
from ips_path.synthetic.megapixel_mnist import (
    DIGIT_SIZE,
    MEGAPIXEL_MNIST_TASKS,
    MegapixelMNIST,
    digit_targets,
    load_digits,
    patch_chunks,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("IPSPATH_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
MNIST = DATA / "mnist"

needs_mnist = pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason=needs_test_data("mnist"))


@pytest.fixture(scope="module")
def train_set() -> MegapixelMNIST:
    return MegapixelMNIST(MNIST, "train", n_images=50, canvas=1500, seed=0)


@pytest.fixture(scope="module")
def small_test_set() -> MegapixelMNIST:
    # A canvas barely larger than the minimum makes overlaps likely if placement were wrong.
    return MegapixelMNIST(MNIST, "test", n_images=120, canvas=120, seed=3)


@needs_mnist
def test_item_shapes_and_types(train_set):
    image, targets = train_set[0]
    assert image.shape == (1, 1500, 1500) and image.dtype == torch.uint8
    assert set(targets) == {"majority", "max", "top", "multilabel"}
    assert all(isinstance(targets[k], int) and 0 <= targets[k] < 10 for k in ("majority", "max", "top"))
    assert targets["multilabel"].shape == (10,) and targets["multilabel"].dtype == torch.float32
    assert len(train_set) == 50
    assert len(MegapixelMNIST(MNIST, "train")) == 5000 and len(MegapixelMNIST(MNIST, "test")) == 1000


@needs_mnist
def test_images_are_a_function_of_seed_split_and_index(train_set):
    again = MegapixelMNIST(MNIST, "train", n_images=50, canvas=1500, seed=0)
    other_seed = MegapixelMNIST(MNIST, "train", n_images=50, canvas=1500, seed=1)
    for index in (0, 7):
        image, targets = train_set[index]
        image_again, targets_again = again[index]
        assert torch.equal(image, image_again)
        assert torch.equal(targets["multilabel"], targets_again["multilabel"])
        assert not torch.equal(image, other_seed[index][0])
    assert not torch.equal(train_set[0][0], train_set[1][0])
    with pytest.raises(IndexError):
        train_set[50]


@needs_mnist
@pytest.mark.parametrize("dataset_name", ["train_set", "small_test_set"])
def test_each_image_holds_three_target_and_two_other_digits(dataset_name, request):
    dataset = request.getfixturevalue(dataset_name)
    for index in range(len(dataset)):
        image, layout = dataset.render(index)
        labels = layout.labels
        assert len(labels) == 5
        assert (labels[:3] == labels[0]).all() and (labels[3:] != labels[0]).all()
        assert (dataset.digit_labels[layout.pool_indices] == labels).all()
        for pool_index, (row, col) in zip(layout.pool_indices, layout.positions, strict=True):
            box = image[row:row + DIGIT_SIZE, col:col + DIGIT_SIZE]
            assert np.array_equal(box, dataset.digits[pool_index])  # the digit is drawn on top, intact


@needs_mnist
@pytest.mark.parametrize("dataset_name", ["train_set", "small_test_set"])
def test_digit_boxes_lie_inside_the_canvas_and_never_overlap(dataset_name, request):
    dataset = request.getfixturevalue(dataset_name)
    for index in range(len(dataset)):
        positions = dataset.render(index)[1].positions
        assert (positions >= 0).all() and (positions + DIGIT_SIZE <= dataset.canvas).all()
        for a, b in combinations(positions, 2):
            assert np.abs(a - b).max() >= DIGIT_SIZE, f"image {index}: boxes at {a} and {b} overlap"


@needs_mnist
def test_noise_strokes_lie_outside_digits_with_the_stated_intensity(train_set):
    image, layout = train_set.render(0)
    outside = np.ones(image.shape, dtype=bool)
    for row, col in layout.positions:
        outside[row:row + DIGIT_SIZE, col:col + DIGIT_SIZE] = False
    noise = image[outside]
    assert (noise > 0).sum() > 50 * 20  # 50 strokes of two lines, each tens of pixels long
    assert noise[noise > 0].min() >= int(0.8 * 255)


@needs_mnist
def test_targets_follow_from_labels_and_positions(train_set):
    image, targets = train_set[4]
    layout = train_set.render(4)[1]
    assert targets["majority"] == layout.labels[0]
    assert targets["max"] == layout.labels.max()
    assert targets["top"] == layout.labels[layout.positions[:, 0].argmin()]


def test_digit_targets_of_a_constructed_example():
    labels = np.array([3, 3, 3, 9, 1])
    # Rows 40 tie for the top-most digit: the left-most one (col 20, a 1) wins.
    positions = np.array([[500, 10], [40, 700], [900, 900], [300, 300], [40, 20]])
    targets = digit_targets(labels, positions)
    assert targets["majority"] == 3
    assert targets["max"] == 9
    assert targets["top"] == 1
    assert targets["multilabel"].tolist() == [0, 1, 0, 1, 0, 0, 0, 0, 0, 1]


@needs_mnist
def test_train_and_test_digit_pools_are_disjoint():
    train_digits, train_labels = load_digits(MNIST, "train")
    test_digits, test_labels = load_digits(MNIST, "test")
    assert train_digits.shape == (10_000, 28, 28) and test_digits.shape == (5_000, 28, 28)
    assert np.bincount(test_labels).tolist() == [500] * 10
    assert set(np.unique(train_labels)) == set(range(10))
    train_bytes = {digit.tobytes() for digit in train_digits}
    assert not any(digit.tobytes() in train_bytes for digit in test_digits)


def test_missing_files_and_bad_arguments_are_named(tmp_path):
    with pytest.raises(BadInputError, match="t10k-images-idx3-ubyte.gz"):
        MegapixelMNIST(tmp_path, "train")
    with pytest.raises(BadInputError, match="split"):
        MegapixelMNIST(tmp_path, "validation")
    with pytest.raises(BadInputError, match="canvas"):
        MegapixelMNIST(tmp_path, "train", canvas=100)


def test_patch_chunks_cover_the_image_in_row_major_order():
    image = torch.arange(1500 * 1500, dtype=torch.int32).reshape(1, 1500, 1500)
    chunks = list(patch_chunks(image, patch_size=50, stride=50, chunk_size=100))
    assert [len(c) for c in chunks] == [100] * 9
    patches = torch.cat([c.patches for c in chunks])
    positions = torch.cat([c.positions for c in chunks])
    assert patches.shape == (900, 1, 50, 50) and positions.dtype == torch.int64
    assert positions[:31].tolist() == [[0, c] for c in range(30)] + [[1, 0]]
    for index in (0, 31, 899):
        row, col = positions[index].tolist()
        assert torch.equal(patches[index], image[:, 50 * row:50 * row + 50, 50 * col:50 * col + 50])


def test_patch_chunks_with_overlap_and_a_ragged_edge():
    image = torch.randint(0, 256, (3, 130, 110), dtype=torch.uint8)
    chunks = list(patch_chunks(image, patch_size=50, stride=40, chunk_size=4))
    positions = torch.cat([c.positions for c in chunks])
    assert [len(c) for c in chunks] == [4, 2]  # rows at 0, 40, (80 fits: 130 >= 130); cols at 0, 40
    assert positions.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]
    assert torch.equal(chunks[1].patches[1], image[:, 80:130, 40:90])
    assert chunks[0].patches.dtype == torch.uint8


def test_patch_chunks_drop_empty_keeps_every_patch_with_signal_and_its_grid_position():
    image = torch.zeros((1, 150, 150), dtype=torch.uint8)
    image[0, 60, 140] = 1  # patch (1, 2)
    image[0, 149, 0] = 255  # patch (2, 0)
    kept = list(patch_chunks(image, patch_size=50, stride=50, chunk_size=1, drop_empty=True))
    assert [c.positions.tolist() for c in kept] == [[[1, 2]], [[2, 0]]]
    assert torch.equal(kept[0].patches[0], image[:, 50:100, 100:150])
    assert sum(len(c) for c in patch_chunks(image, 50, 50, 100)) == 9  # by default every patch stays


def test_patch_chunks_of_an_empty_image_keep_one_patch():
    chunks = list(patch_chunks(torch.zeros((1, 100, 100), dtype=torch.uint8), 50, 50, 10, drop_empty=True))
    assert [c.positions.tolist() for c in chunks] == [[[0, 0]]]


def test_tasks_match_the_target_keys():
    targets = digit_targets(np.array([1, 1, 1, 2, 3]), np.zeros((5, 2), dtype=np.int64))
    assert [t.name for t in MEGAPIXEL_MNIST_TASKS] == list(targets)
    assert {t.name: t.kind for t in MEGAPIXEL_MNIST_TASKS}["multilabel"] == "multilabel"


@needs_mnist
@pytest.mark.slow
def test_ips_learns_megapixel_mnist_from_scratch():
    """The CPU smoke preset of bench/mnist_bench.py, cut to 3 epochs: the majority digit is learned far
    above the 10 % of chance (the full preset reaches about 85 %)."""
    from bench.mnist_bench import PAPER, PRESETS, run

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the figures of the benchmark; results depend slightly on the thread count
    try:
        result = run({**PAPER, **PRESETS["cpu_smoke"], "epochs": 3}, torch.device("cpu"), MNIST, workers=0, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert result["final_test_accuracy"]["majority"] >= 0.3
    assert result["history"][-1]["test_digits_selected"] > 0.5
