"""Linear probes: how well a set of patch features separates two kinds of patch, given patch labels.

A lab with a few annotated regions can compare encoders this way before training slide models on them:
features whose probe cannot tell a lesion from its look-alikes give an IPS model nothing to attend to.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ips_path.evaluation.metrics import roc_auc

__all__ = ["linear_probe_auc"]


def linear_probe_auc(fit_features: np.ndarray, fit_positive: np.ndarray, score_features: np.ndarray,
                     score_positive: np.ndarray, *, l2: float = 1e-3, max_iter: int = 200) -> float:
    """ROC AUC of a class-balanced logistic regression fitted on one set of patches and scored on another.

    Parameters
    ----------
    fit_features, score_features : (n, d) array
        Patch features (any float dtype) to fit the probe on and to score it on (other slides).
    fit_positive, score_positive : (n,) bool array
        Which patches are of the positive kind (e.g. inside a lesion).
    l2 : float
        Weight of the squared-norm penalty on the probe's weights (features are standardised first, with
        the mean and standard deviation of ``fit_features``).
    max_iter : int
        L-BFGS iterations.

    Returns
    -------
    float
        AUC on the scored patches (NaN when they lack one of the kinds).
    """
    x = torch.as_tensor(np.asarray(fit_features, dtype=np.float32))
    y = torch.as_tensor(np.asarray(fit_positive, dtype=bool)).float()
    if not 0 < float(y.mean()) < 1:
        raise ValueError("the probe needs patches of both kinds to fit on")
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    weight = torch.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(x @ w + b, y, weight=weight) + l2 * w.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    scored = (torch.as_tensor(np.asarray(score_features, dtype=np.float32)) - mean) / std
    with torch.no_grad():
        scores = (scored @ w + b).numpy()
    return roc_auc(np.asarray(score_positive, dtype=bool), scores)
