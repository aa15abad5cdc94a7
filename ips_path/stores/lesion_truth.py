"""Where training looked, for tile stores that know their lesions.

A tile store may hold ``truth/lesion``: the fraction (0-1) of each patch inside a lesion, written by
:func:`ips_path.synthetic.synth.write_lesion_truth` for generated slides (or by a user from annotations).
``ipspath train`` then reports per epoch how often the patches it trained on (the M selected per
slide) overlapped a lesion: the measurement that tells whether IPS ever shows its gradient phase
the lesion.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ips_path.stores.tile_store import TileStore

__all__ = ["LESION_TRUTH_ARRAY", "TrainedOnLesions"]

LESION_TRUTH_ARRAY = "truth/lesion"


class TrainedOnLesions:
    """Counts, over one epoch, the trained patches of lesion-holding slides that overlap a lesion.

    Slides whose store has no truth, or whose truth holds no lesion, are not counted.
    """

    def __init__(self) -> None:
        self._truth: dict[Path, np.ndarray | None] = {}
        self.in_lesion = self.trained = self.found = self.slides = 0

    def record(self, store_path: Path, trained: np.ndarray) -> None:
        """Count the patches ``trained`` (stream indices) of the slide whose tile store is ``store_path``."""
        if store_path not in self._truth:
            store = TileStore.open(store_path)
            has_truth = store.has_array(LESION_TRUTH_ARRAY)
            self._truth[store_path] = store.read_array(LESION_TRUTH_ARRAY) > 0 if has_truth else None
        lesion = self._truth[store_path]
        if lesion is None or not lesion.any():
            return
        hits = int(lesion[trained].sum())
        self.in_lesion, self.trained = self.in_lesion + hits, self.trained + len(trained)
        self.found, self.slides = self.found + (hits > 0), self.slides + 1

    def summary(self, total: Callable[[float], float] = float) -> dict[str, float]:
        """``train_selected_in_lesion``: share of the trained patches of lesion-holding slides that overlap
        a lesion; ``train_lesion_found``: share of those slides with at least one such patch trained on.
        Empty when no slide was counted. ``total`` sums a count over processes (distributed runs)."""
        in_lesion, trained, found, slides = (total(v) for v in (self.in_lesion, self.trained, self.found,
                                                                 self.slides))
        if not slides:
            return {}
        return {"train_selected_in_lesion": in_lesion / trained, "train_lesion_found": found / slides}
