import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from archlab.analysis import PowerLawFit, fit_power_law
from archlab.errors import ConfigError, DataError

X = np.geomspace(1e3, 1e8, 9)


@pytest.mark.parametrize(("x_c", "alpha"), [(8.8e13, 0.076), (5e4, 0.35), (2.0, 1.5)])
def test_pure_law_is_recovered_exactly(x_c, alpha):
    fit = fit_power_law(X, (x_c / X) ** alpha)
    assert fit.x_c == pytest.approx(x_c, rel=1e-10) and fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.irreducible is None and fit.r2 == pytest.approx(1, abs=1e-12) and fit.n_points == len(X)


@pytest.mark.parametrize(("x_c", "alpha", "E"), [(8.8e13, 0.076, 1.3), (5e4, 0.35, 1.7), (3e2, 0.5, 0.2)])
def test_law_with_an_irreducible_term_is_recovered_exactly(x_c, alpha, E):
    y = E + (x_c / X) ** alpha
    fit = fit_power_law(X, y, irreducible=True)
    assert fit.irreducible == pytest.approx(E, rel=1e-10)
    assert fit.alpha == pytest.approx(alpha, rel=1e-10) and fit.x_c == pytest.approx(x_c, rel=1e-9)
    assert fit.r2 == pytest.approx(1, abs=1e-12)
    assert fit.predict(X) == pytest.approx(y, rel=1e-12)
    pure = fit_power_law(X, y)  # the pure law cannot bend: a worse fit and a flatter exponent
    assert pure.r2 < 1 - 1e-4 and pure.alpha < alpha


def test_a_pure_law_fitted_with_an_irreducible_term_gets_e_near_zero():
    fit = fit_power_law(X, (5e4 / X) ** 0.35, irreducible=True)
    assert fit.irreducible == pytest.approx(0, abs=1e-10) and fit.alpha == pytest.approx(0.35, rel=1e-10)


def test_noisy_data_within_tolerance():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e3, 1e7, 30)
    noise = np.exp(rng.normal(0, 0.01, len(x)))  # 1% multiplicative noise
    pure = fit_power_law(x, (5e4 / x) ** 0.35 * noise)
    assert pure.alpha == pytest.approx(0.35, abs=0.01) and pure.x_c == pytest.approx(5e4, rel=0.2) and pure.r2 > 0.99
    fit = fit_power_law(x, (1.7 + (5e4 / x) ** 0.35) * noise, irreducible=True)
    assert fit.irreducible == pytest.approx(1.7, abs=0.1) and fit.alpha == pytest.approx(0.35, abs=0.1)


def test_the_fit_is_the_log_space_least_squares_solution():
    """Against numpy's polyfit of log y on log x, and R^2 from its residuals."""
    rng = np.random.default_rng(1)
    x, y = np.geomspace(10, 1e4, 12), np.exp(rng.normal(0, 0.3, 12)) * 3
    fit = fit_power_law(x, y)
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    residual = np.log(y) - (intercept + slope * np.log(x))
    r2 = 1 - (residual**2).sum() / ((np.log(y) - np.log(y).mean()) ** 2).sum()
    assert fit.alpha == pytest.approx(-slope, rel=1e-10) and math.log(fit.x_c) == pytest.approx(intercept / -slope)
    assert fit.r2 == pytest.approx(r2, rel=1e-10)


def test_the_irreducible_fit_is_a_local_minimum_of_the_log_space_error():
    rng = np.random.default_rng(2)
    x = np.geomspace(1e2, 1e6, 10)
    y = (1.2 + (3e3 / x) ** 0.4) * np.exp(rng.normal(0, 0.02, 10))
    fit = fit_power_law(x, y, irreducible=True)

    def error(E, x_c, alpha):
        return ((np.log(y) - np.log(E + (x_c / x) ** alpha)) ** 2).sum()

    best = error(fit.irreducible, fit.x_c, fit.alpha)
    for dE, dx, da in [(1e-3, 0, 0), (-1e-3, 0, 0), (0, 1e-3, 0), (0, -1e-3, 0), (0, 0, 1e-3), (0, 0, -1e-3)]:
        assert error(fit.irreducible + dE, fit.x_c * (1 + dx), fit.alpha + da) > best


def test_inputs_may_be_lists_or_tensors_and_predict_keeps_the_shape():
    x = [1.0, 2.0, 4.0, 8.0]
    y = [(3.0 / v) ** 0.5 for v in x]
    fit = fit_power_law(torch.tensor(x, requires_grad=True), torch.tensor(y, dtype=torch.float64))
    assert isinstance(fit, PowerLawFit) and fit.alpha == pytest.approx(0.5, rel=1e-6)
    assert isinstance(fit.predict(3.0), float) and fit.predict(3.0) == pytest.approx(1.0, rel=1e-6)
    assert fit.predict(np.ones((2, 3))).shape == (2, 3)
    assert fit.formula("N") == "(3 / N)^0.5"
    assert fit_power_law(X, 1.3 + (5e4 / X) ** 0.35, irreducible=True).formula("N") == "1.3 + (5e+04 / N)^0.35"


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "error", "words"),
    [
        ([1, 2], [3, 2], {}, DataError, "at least 3 points (x, y); got 2"),
        ([1, 2, 3], [3, 2], {}, DataError, "x has 3 values and y has 2"),
        ([1, 0, 3], [3, 2, 1], {}, DataError, "x[1]=0.0: every x must be finite and > 0"),
        ([1, 2, 3], [3, -2, 1], {}, DataError, "y[1]=-2.0: every y must be finite and > 0"),
        ([1, 2, float("nan")], [3, 2, 1], {}, DataError, "x[2]=nan"),
        ([1, 2, 3], [3, 2, float("inf")], {}, DataError, "y[2]=inf"),
        ([[1, 2, 3]], [3, 2, 1], {}, DataError, "x must be 1-D (one value per point), got shape [1, 3]"),
        (["a", "b", "c"], [3, 2, 1], {}, DataError, "x must hold numbers"),
        ([2, 2, 2], [3, 2, 1], {}, DataError, "x has 1 distinct value(s); the fit needs at least 2"),
        ([1, 1, 2], [3, 2, 1], {"irreducible": True}, DataError, "x has 2 distinct value(s); the fit needs at least 3"),
        ([1, 2, 3], [2, 2, 2], {}, DataError, "y is constant (2.0): no power law"),
        ([1, 2, 3], [3, 2, 1], {"irreducible": "yes"}, ConfigError, "irreducible='yes' must be True or False"),
    ],
)
def test_bad_input_is_named_before_fitting(x, y, kwargs, error, words):
    with pytest.raises(error) as raised:
        fit_power_law(x, y, **kwargs)
    assert words in str(raised.value)


def test_predict_rejects_non_positive_x():
    fit = fit_power_law([1, 2, 4], [3, 2, 1])
    with pytest.raises(DataError, match=r"x\[1\]=-1.0: every x must be finite and > 0"):
        fit.predict([1.0, -1.0])


def test_losses_near_the_float64_limits_fit_without_hanging_and_scale_with_y():
    # y ~ 1e-300: the Jacobian 1/L overflowed and LAPACK's least squares looped forever on inf/NaN (a hang)
    code = ("from archlab.analysis import fit_power_law; "
            "print(fit_power_law([1, 2, 3, 4], [1e-300, 2e-300, 3e-300, 5e-300], irreducible=True).alpha)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    at_one = fit_power_law([1, 2, 3, 4], [1, 2, 3, 5], irreducible=True)
    tiny = fit_power_law([1, 2, 3, 4], [1e-300, 2e-300, 3e-300, 5e-300], irreducible=True)
    assert tiny.alpha == pytest.approx(at_one.alpha, rel=1e-6) and tiny.r2 == pytest.approx(at_one.r2, rel=1e-9)
    assert tiny.irreducible == pytest.approx(at_one.irreducible * 1e-300, rel=1e-6)
    assert float(done.stdout) == pytest.approx(at_one.alpha, rel=1e-6)


def test_an_x_c_beyond_float64_and_a_meta_tensor_are_data_errors():
    x = np.array([10.0, 100.0, 1000.0, 10000.0])
    with pytest.raises(DataError, match=r"the fitted x_c = e\^.* is beyond float64 \(alpha=0\.3\): rescale y"):
        fit_power_law(x, (3 + 5 * x**-0.3) * 1e300, irreducible=True)  # x_c = (5e300)^(1 / 0.3): not a float
    with pytest.raises(DataError, match="x is a tensor on the meta device: it has shapes but no values"):
        fit_power_law(torch.ones(3, device="meta"), [3.0, 2.0, 1.0])
