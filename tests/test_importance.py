"""gamma and theta from an ORM matrix (OMPQ Sec. 3.3)."""

import numpy as np
import pytest

from ompq_plugin.importance import THETA_FLOOR, gamma_from_orm, importance


def test_gamma_is_row_sum_minus_one():
    k = np.array([[1.0, 0.2, 0.5], [0.2, 1.0, 0.1], [0.5, 0.1, 1.0]])
    np.testing.assert_allclose(gamma_from_orm(k), [0.7, 0.3, 0.6])


def test_exp_importance_is_normalised_exp_minus_beta_gamma():
    gamma = np.array([0.7, 0.3, 0.6])
    theta = importance(gamma, beta=2.0)
    expected = np.exp(-2.0 * gamma) / np.exp(-2.0 * gamma).max()
    np.testing.assert_allclose(theta, expected, rtol=1e-12)
    assert theta.max() == 1.0


def test_exp_importance_survives_betas_that_underflow():
    gamma = np.array([10.0, 12.0, 10.05])  # exp(-100 * 10) == 0.0 in float64
    theta = importance(gamma, beta=100.0)
    assert theta[0] == 1.0
    assert theta[2] == pytest.approx(np.exp(-5.0))
    assert theta[1] == THETA_FLOOR  # exp(-200) floored, still the smallest


@pytest.mark.parametrize("function", ["neglog", "neg", "negcube", "negexp"])
def test_alternative_functions_decrease_and_are_positive(function):
    gamma = np.array([0.5, 2.0, 1.0, 3.0])
    theta = importance(gamma, function=function)
    order = np.argsort(gamma)
    assert np.all(np.diff(theta[order]) < 0)  # strictly decreasing in gamma
    assert theta.max() == pytest.approx(1.0) and theta.min() >= THETA_FLOOR


def test_beta_zero_makes_all_layers_equal():
    np.testing.assert_array_equal(importance(np.array([1.0, 5.0]), beta=0.0), [1.0, 1.0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="square"):
        gamma_from_orm(np.ones((2, 3)))
    with pytest.raises(ValueError, match="unknown importance"):
        importance(np.ones(2), function="sqrt")
