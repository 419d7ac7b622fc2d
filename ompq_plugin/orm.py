"""Orthogonality metric (ORM), OMPQ Eq. 6-7, in Gram form.

For features Y (N x D1) and Z (N x D2) of the same N samples::

    ORM(Y, Z) = ||Z^T Y||_F^2 / (||Y^T Y||_F ||Z^T Z||_F)
              = <vec(Y Y^T), vec(Z Z^T)> / (||Y Y^T||_F ||Z Z^T||_F)

The second form needs only each layer's N x N Gram matrix, so features can be dropped as soon
as their Gram is formed: memory O(L N^2) instead of O(sum_i N D_i). Everything is float64.

Two forms are offered:

* ``"centred"`` (default): Grams are double-centred, H G H with H = I - 11^T/N. This is linear
  CKA and is what the authors' code (MAC-AutoML/OMPQ, ``mixed_bit/ORM.py``) computes. We make
  it the default because post-ReLU features are non-negative: their uncentred Grams are
  dominated by the shared mean, so uncentred ORM crowds every pair of layers towards 1 and the
  importances barely differ (see ``bench/results/search_speed.json`` for the measured spread).
* ``"uncentred"``: Eq. 6 exactly as printed in the paper.

This module is pure maths (torch tensors or numpy arrays in, numpy out); it imports neither
Brevitas nor ONNX.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

OrmForm = Literal["centred", "uncentred"]
ORM_FORMS: tuple[str, ...] = ("centred", "uncentred")


def gram(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """N x N Gram matrix Y Y^T (float64) of a batch of features of any shape (N, ...)."""
    y = torch.as_tensor(features)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    return y @ y.T


def center(g: torch.Tensor) -> torch.Tensor:
    """Double-centre a Gram matrix: H G H with H = I - 11^T / N (each of a stack of them)."""
    g = g.to(torch.float64)
    row_mean = g.mean(dim=-2, keepdim=True)
    col_mean = g.mean(dim=-1, keepdim=True)
    return g - row_mean - col_mean + g.mean(dim=(-2, -1), keepdim=True)


def _prepare(g: torch.Tensor, form: OrmForm) -> torch.Tensor:
    if form not in ORM_FORMS:
        raise ValueError(f"unknown ORM form {form!r}; choose one of {ORM_FORMS}")
    return center(g) if form == "centred" else g.to(torch.float64)


def orm_from_grams(g_y: torch.Tensor, g_z: torch.Tensor, form: OrmForm = "centred") -> float:
    """ORM of two layers from their N x N Gram matrices."""
    a, b = _prepare(g_y, form), _prepare(g_z, form)
    return float((a * b).sum() / (torch.linalg.norm(a) * torch.linalg.norm(b)))


Features = torch.Tensor | np.ndarray


def orm(y: Features, z: Features, form: OrmForm = "centred") -> float:
    """ORM(Y, Z) of two feature batches with the same N (first dimension)."""
    return orm_from_grams(gram(y), gram(z), form)


def _flat_prepared(grams: list[torch.Tensor], form: OrmForm) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, norms): every Gram prepared as ``form`` says (all at once), flattened to a row of
    an L x N^2 float64 matrix, and each row's Frobenius norm."""
    g = _prepare(torch.stack([x.to(torch.float64) for x in grams]), form)
    rows = g.reshape(len(grams), -1)
    return rows, torch.linalg.norm(rows, dim=1)


def orm_matrix(grams: list[torch.Tensor], form: OrmForm = "centred") -> np.ndarray:
    """K = [ORM(i, j)] for all layer pairs: symmetric, unit diagonal, entries in [0, 1].

    Each Gram is normalised to unit Frobenius norm, flattened into a row of V, and K = V V^T:
    one L x N^2 by N^2 x L product instead of L^2 separate traces.

    A layer whose (centred) Gram is zero -- its feature is the same for every sample, e.g. an SE
    gate or a head at its bias -- carries no information: its row and column are 0 (diagonal 1).
    :func:`uninformative` names those layers.
    """
    if not grams:
        return np.zeros((0, 0))
    rows, norms = _flat_prepared(grams, form)
    bad = (~torch.isfinite(norms)).nonzero()
    if len(bad):
        raise ValueError(f"Gram matrix {int(bad[0])} has a non-finite norm")
    v = rows / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]  # a zero row stays 0
    k = (v @ v.T).numpy()
    k = (k + k.T) / 2  # exact symmetry
    np.fill_diagonal(k, 1.0)
    return np.clip(k, 0.0, 1.0)


def uninformative(grams: list[torch.Tensor], form: OrmForm = "centred") -> list[int]:
    """Indices of layers whose (centred) Gram is zero: the same feature for every sample."""
    if not grams:
        return []
    return (_flat_prepared(grams, form)[1] == 0.0).nonzero().flatten().tolist()
