"""Exact maths of the orthogonality metric (OMPQ Eq. 6-7) on small cases."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ompq_plugin.orm import gram, orm, orm_from_grams, orm_matrix

FORMS = ["centred", "uncentred"]


def eq6_direct(y: np.ndarray, z: np.ndarray) -> float:
    """||Z^T Y||_F^2 / (||Y^T Y||_F ||Z^T Z||_F), computed in feature space."""
    return np.linalg.norm(z.T @ y) ** 2 / (np.linalg.norm(y.T @ y) * np.linalg.norm(z.T @ z))


def random_features(seed: int, n: int = 8, d: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


@pytest.mark.parametrize("form", FORMS)
def test_orm_of_a_feature_with_itself_is_one(form):
    y = random_features(0)
    assert orm(y, y, form) == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_features_give_zero():
    # Rows of Y and Z span orthogonal column spaces -> Y Y^T and Z Z^T have disjoint support.
    y = np.zeros((4, 3))
    z = np.zeros((4, 2))
    y[:2] = [[1, 2, 0], [0, 1, 3]]
    z[2:] = [[1, 0], [2, 5]]
    assert orm(y, z, "uncentred") == pytest.approx(0.0, abs=1e-15)


def test_centred_orthogonal_features_give_zero():
    # Zero-mean features living on disjoint samples: centring leaves them orthogonal.
    y = np.array([[1.0], [-1.0], [0.0], [0.0]])
    z = np.array([[0.0], [0.0], [1.0], [-1.0]])
    assert orm(y, z, "centred") == pytest.approx(0.0, abs=1e-15)
    # A shared constant offset is invisible to the centred form but not to the uncentred one.
    assert orm(y + 5, z + 5, "centred") == pytest.approx(0.0, abs=1e-12)
    assert orm(y + 5, z + 5, "uncentred") > 0.9


@pytest.mark.parametrize("seed", range(5))
def test_gram_form_equals_eq6_computed_directly(seed):
    y = random_features(seed, d=7)
    z = random_features(seed + 100, d=3)
    assert orm(y, z, "uncentred") == pytest.approx(eq6_direct(y, z), rel=1e-12)
    yc, zc = y - y.mean(0), z - z.mean(0)
    assert orm(y, z, "centred") == pytest.approx(eq6_direct(yc, zc), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scale_y=st.floats(1e-3, 1e3),
    scale_z=st.floats(1e-3, 1e3),
    form=st.sampled_from(FORMS),
)
def test_symmetric_scale_and_rotation_invariant(seed, scale_y, scale_z, form):
    rng = np.random.default_rng(seed)
    y, z = rng.normal(size=(6, 4)), rng.normal(size=(6, 9))
    base = orm(y, z, form)
    assert 0.0 <= base <= 1.0 + 1e-12
    assert orm(z, y, form) == pytest.approx(base, rel=1e-10)
    assert orm(scale_y * y, scale_z * z, form) == pytest.approx(base, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))  # orthogonal rotation of Y's features
    assert orm(y @ q, z, form) == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("form", FORMS)
def test_orm_matrix_matches_pairwise_orm(form):
    feats = [random_features(s, n=6, d=d) for s, d in zip(range(4), (3, 5, 2, 8), strict=True)]
    k = orm_matrix([gram(f) for f in feats], form)
    assert k.shape == (4, 4)
    np.testing.assert_array_equal(k, k.T)
    np.testing.assert_array_equal(np.diag(k), np.ones(4))
    for i in range(4):
        for j in range(4):
            if i != j:
                assert k[i, j] == pytest.approx(orm(feats[i], feats[j], form), rel=1e-12)


def test_orm_accepts_image_shaped_features_and_float32():
    y = torch.randn(5, 2, 3, 3)
    assert orm_from_grams(gram(y), gram(y.reshape(5, -1).double())) == pytest.approx(1.0)
