"""The cached features a model trained with ``--features`` reads, made for the new slides it predicts.

Training records what made the features of its tile stores (:func:`features_recipe`: the encoder, its
options, the digest of its weights; or the tool and extractor they were imported from) in the
checkpoint, under ``tiling["features"]``. ``ipspath predict`` then computes the same features for a
slide whose store lacks them (:func:`ensure_features`), when the encoder needs nothing the model
does not carry; otherwise it says once, before any slide, which command makes them
(:func:`check_features_makeable`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ips_path.runtime.errors import BadInputError
from ips_path.runtime.identity import identity_differences
from ips_path.stores.tile_store import GRID_ATTR, TileStore

__all__ = ["check_features_makeable", "ensure_features", "features_recipe"]

# Identity keys of computed features that are not options of the encoder (see ips_path.stores.features).
_NOT_OPTIONS = ("encoder", "weights_sha256", "stain_norm", "dim")
# What differs from slide to slide (an imported file's own identity, the store's patch grid): not the recipe.
_PER_SLIDE = ("source", GRID_ATTR)


def features_recipe(identities: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """What made the cached features of a run's stores (their identities), if one thing made them all.

    None when a store's features record no identity or the stores' features were made differently.
    """
    recipes = [None if i is None else {k: v for k, v in i.items() if k not in _PER_SLIDE} for i in identities]
    first = recipes[0] if recipes else None
    return first if first is not None and all(r == first for r in recipes) else None


def check_features_makeable(checkpoint: Mapping[str, Any], stores: Sequence[Path], tiles_dir: Path,
                            slides: str) -> None:
    """Refuse, in one line before any slide, to predict slides lacking features predict cannot make.

    Parameters
    ----------
    checkpoint : mapping
        The model's checkpoint.
    stores : sequence of Path
        The tile stores the slides will have (they may not exist yet).
    tiles_dir : Path
        Where they are.
    slides : str
        The slides as the command line named them (files, patterns, ``--manifest M``): tiled first
        when some stores are missing.

    Raises
    ------
    BadInputError
        The model reads features that some store lacks and whose encoder needs weights the model does
        not carry, or that were imported from another tool: with the command(s) that make them.
    """
    name = checkpoint["config"].get("features")
    if name is None:
        return
    lacking = [p for p in stores if not (p / "features" / name / "zarr.json").is_file()]
    advice = _advice(name, checkpoint["tiling"].get("features"), tiles_dir)
    if not lacking or advice is None:
        return
    tiling = checkpoint["tiling"]
    first = (f"ipspath tile {slides} -o {tiles_dir} --mpp {tiling['target_mpp']:g} --patch-size "
             f"{tiling['patch_size']} && " if any(not p.exists() for p in lacking) else "")
    raise BadInputError(f"{len(lacking)} slide(s) lack the features/{name} the model reads, {advice[0]}: "
                        f"{first}{advice[1]}; then run this predict again")


def ensure_features(store: TileStore, name: str, checkpoint: Mapping[str, Any], *, device: str, chunk_size: int,
                    threads: int | None) -> None:
    """Give ``store`` the ``features/<name>`` the model of ``checkpoint`` was trained on, computing them here.

    Features already there must be what the model was trained on.

    Raises
    ------
    BadInputError
        The store's features were made otherwise than the model's, or predict cannot make them (the
        encoder needs weights, the features were imported, or the model records no recipe): with the
        command that makes them.
    """
    from ips_path.stores.features import FeatureSettings, cache_features

    recipe = checkpoint["tiling"].get("features")
    array = f"features/{name}"
    if store.has_array(array):
        made = store.array_attrs(array).get("identity")
        if recipe is not None and made is not None and features_recipe([made]) != recipe:
            differs = ", ".join(identity_differences(recipe, features_recipe([made])))
            raise BadInputError(f"{store.path}: its {array} were made otherwise than those the model was trained on "
                                f"({differs}); make them again with `ipspath features {store.path} --name {name} "
                                f"--encoder {recipe.get('encoder')} --overwrite`")
        return
    advice = _advice(name, recipe, store.path.parent)
    if advice is not None:
        raise BadInputError(f"{store.path}: no {array}, {advice[0]}: {advice[1]}")
    options = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in recipe.items()
                           if k not in _NOT_OPTIONS))
    identity = {k: recipe[k] for k in ("encoder", "weights_sha256", "stain_norm") if k in recipe}
    settings = FeatureSettings(recipe["encoder"], name, None, identity, device, chunk_size, threads,
                               stain_norm=bool(recipe.get("stain_norm")), encoder_options=options)
    made = cache_features(store.path, settings).identity
    if features_recipe([made]) != recipe:  # e.g. an encoder whose defaults changed since training
        raise BadInputError(f"{store.path}: the {array} computed here differ from the model's "
                            f"({', '.join(identity_differences(recipe, made))}); use the ipspath version that "
                            "trained the model")


def _advice(name: str, recipe: Mapping[str, Any] | None, tiles_dir: str | os.PathLike) -> tuple[str, str] | None:
    """(why predict cannot make the features, the command that does), or None when predict can."""
    if recipe is None:
        return ("and the model records no one encoder for them (trained by an older ipspath, or on features made "
                "differently from store to store)",
                f"ipspath features {tiles_dir} --name {name} --encoder ENCODER (the one the model was trained on)")
    if "tool" in recipe:
        tool, encoder = str(recipe["tool"]), recipe.get("encoder") or "its encoder"
        return (f"imported from {tool.upper()} files of the extractor {encoder!r}: new slides need features from "
                f"the same extractor",
                f"extract them with {tool.upper()} ({encoder}) and import them: ipspath features import FOLDER "
                f"--manifest MANIFEST -o {tiles_dir} --format {tool} --name {name}")
    if recipe.get("weights_sha256"):
        stain = " --stain-norm" if recipe.get("stain_norm") else ""
        return (f"made by {recipe['encoder']} with weights the model does not carry (SHA-256 "
                f"{recipe['weights_sha256'][:12]}...)",
                f"ipspath features {tiles_dir} --name {name} --encoder {recipe['encoder']} --pretrained WEIGHTS_FILE"
                f"{stain}")
    return None
