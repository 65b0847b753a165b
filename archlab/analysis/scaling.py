r"""Scaling-law fits: power laws in a model size, a data size or a compute budget (Kaplan et al. 2020).

Two forms, for points ``(x_i, y_i)`` with ``x_i, y_i > 0`` (``x`` is ``N``, ``D`` or ``C``; ``y`` a loss)::

    pure          L(x) = (x_c / x)^alpha          log L = alpha log x_c - alpha log x: a line in log-log
    irreducible   L(x) = E + (x_c / x)^alpha      E in [0, min y): the loss no size removes

The pure law is ordinary least squares of ``log y`` on ``log x`` (exact for an exact power law). The
irreducible one minimises the same log-space error ``sum_i (log y_i - log L(x_i))^2``: a grid over ``E``
with the log-log fit of ``y - E`` inside gives a start, Levenberg-Marquardt steps on ``(E, log-intercept,
slope)`` polish it to machine precision, and the pure fit (``E = 0``) is kept if it is no worse. ``r2`` is
``1 - SS_res / SS_tot`` of ``log y`` for both forms. Everything is float64 NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from archlab.errors import ConfigError, DataError

MIN_POINTS = 3
E_GRID = 256  # starting values of E tried before the polish
POLISH_STEPS = 100


@dataclass(frozen=True)
class PowerLawFit:
    """``L(x) = E + (x_c / x)^alpha`` as fitted by :func:`fit_power_law`.

    Args:
        x_c: the scale ``x_c`` (where the power-law term equals 1).
        alpha: the exponent (``> 0`` when ``L`` falls with ``x``).
        irreducible: ``E``; None for a pure power law.
        r2: the coefficient of determination of ``log y`` (1: every point on the curve).
        n_points: how many points were fitted.
    """

    x_c: float
    alpha: float
    irreducible: float | None
    r2: float
    n_points: int

    def predict(self, x: Any) -> Any:
        """``L(x)`` for ``x > 0``: a float for a scalar, else a float64 array of ``x``'s shape."""
        values = _as_positive("x", x, ndim=None)
        floor = 0.0 if self.irreducible is None else self.irreducible
        out = floor + np.exp(self.alpha * (np.log(self.x_c) - np.log(values)))
        return float(out) if out.ndim == 0 else out

    def formula(self, x: str = "x") -> str:
        """The fit as text: ``"1.2 + (3.4e+05 / N)^0.076"``."""
        term = f"({self.x_c:.3g} / {x})^{self.alpha:.3g}"
        return term if self.irreducible is None else f"{self.irreducible:.3g} + {term}"


def fit_power_law(x: Any, y: Any, *, irreducible: bool = False) -> PowerLawFit:
    """Fit ``y ~ (x_c / x)^alpha`` (or ``E + (x_c / x)^alpha`` with ``irreducible=True``) in log space.

    Args:
        x, y: 1-D sequences, arrays or tensors of the same length (at least 3), finite and ``> 0``; ``x`` with
            at least 2 distinct values (3 with ``irreducible``), ``y`` not constant.
        irreducible: also fit ``E`` in ``[0, min y)``.

    Raises:
        DataError: for inputs the fit cannot use (named, with the value and what is allowed).
        ConfigError: ``irreducible`` not a bool.
    """
    if not isinstance(irreducible, bool):
        raise ConfigError(f"irreducible={irreducible!r} must be True or False")
    xs, ys = _as_positive("x", x, ndim=1), _as_positive("y", y, ndim=1)
    if len(xs) != len(ys):
        raise DataError(f"x has {len(xs)} values and y has {len(ys)}: they must pair up (same length)")
    if len(xs) < MIN_POINTS:
        raise DataError(f"a power-law fit needs at least {MIN_POINTS} points (x, y); got {len(xs)}")
    distinct = len(np.unique(xs))
    if distinct < 2 + irreducible:
        raise DataError(f"x has {distinct} distinct value(s); the fit needs at least {2 + irreducible}")
    if np.ptp(ys) == 0:
        raise DataError(f"y is constant ({float(ys[0])!r}): no power law (alpha would be 0 and x_c undefined)")
    u, v = np.log(xs), np.log(ys)
    if not irreducible:
        b, s = _line(u, v)
        return _fit(b, s, None, _ss_res(u, v, b, s, 0.0), v)
    shift = float(v.mean())  # fit y / exp(shift), near 1: losses of 1e-300 or 1e300 keep the Jacobian finite
    E, b, s = _fit_irreducible(u, v - shift, float(np.exp(v.min() - shift)))
    E, b = E * float(np.exp(shift)), b + shift
    return _fit(b, s, E, _ss_res(u, v, b, s, E), v)


def _as_positive(name: str, values: Any, ndim: int | None) -> np.ndarray:
    """``values`` as float64 (``ndim`` dimensions unless None), every entry finite and ``> 0``."""
    if hasattr(values, "detach"):  # a torch tensor
        if values.is_meta:
            raise DataError(f"{name} is a tensor on the meta device: it has shapes but no values to fit")
        values = values.detach().cpu()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{name} must hold numbers, got {values!r} ({error})") from None
    if ndim is not None and array.ndim != ndim:
        raise DataError(f"{name} must be {ndim}-D (one value per point), got shape {list(array.shape)}")
    bad = ~(np.isfinite(array) & (array > 0))
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f"{name}[{', '.join(map(str, at))}]" if at else name
        raise DataError(
            f"{where}={float(array[at])!r}: every {name} must be finite and > 0 (the fit works on log {name})"
        )
    return array


def _line(u: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """Least-squares ``v ~ b + s u``: ``(b, s)``."""
    um, vm = u.mean(), v.mean()
    s = float(((u - um) * (v - vm)).sum() / ((u - um) ** 2).sum())
    return float(vm - s * um), s


def _log_model(u: np.ndarray, b: float, s: float, E: float) -> np.ndarray:
    """``log(E + exp(b + s u))``, the log of the law at ``u = log x``."""
    return np.logaddexp(np.log(E), b + s * u) if E > 0 else b + s * u


def _ss_res(u: np.ndarray, v: np.ndarray, b: float, s: float, E: float) -> float:
    return float(((v - _log_model(u, b, s, E)) ** 2).sum())


def _fit_irreducible(u: np.ndarray, v: np.ndarray, y_min: float) -> tuple[float, float, float]:
    """``(E, b, s)`` minimising the log-space error: the best start on a grid of ``E``, then polished."""
    y = np.exp(v)
    ratios = np.concatenate([np.linspace(0.0, 0.99, E_GRID // 2), 1 - np.geomspace(1e-2, 1e-8, E_GRID // 2)])
    best = None
    for E in y_min * ratios:
        b, s = _line(u, np.log(y - E))
        err = _ss_res(u, v, b, s, E)
        if best is None or err < best[0]:
            best = (err, E, b, s)
    err, E, b, s = _polish(u, v, y_min, *best)
    b0, s0 = _line(u, v)
    return (E, b, s) if err <= _ss_res(u, v, b0, s0, 0.0) else (0.0, b0, s0)


def _polish(u: np.ndarray, v: np.ndarray, y_min: float, err: float, E: float, b: float,
            s: float) -> tuple[float, float, float, float]:  # fmt: skip
    """Levenberg-Marquardt on ``r = v - log(E + exp(b + s u))`` over ``(E, b, s)``, ``E`` kept in ``[0, y_min)``."""
    damping = 1e-3
    for _ in range(POLISH_STEPS):
        power = np.exp(b + s * u)
        model = E + power
        J = -np.stack([1 / model, power / model, u * power / model], axis=1)  # dr / d(E, b, s)
        r = v - np.log(model)
        with np.errstate(over="ignore", invalid="ignore"):
            JtJ, Jtr = J.T @ J, J.T @ r
        if not (np.isfinite(JtJ).all() and np.isfinite(Jtr).all()):
            break  # y near the float64 limits (1e-300): LAPACK can loop forever on inf/NaN; keep the best so far
        improved = False
        while damping < 1e12:
            step = np.linalg.lstsq(JtJ + damping * np.diag(np.diag(JtJ)), -Jtr, rcond=None)[0]
            E_new = min(max(E + step[0], 0.0), y_min * (1 - 1e-12))
            b_new, s_new = b + step[1], s + step[2]
            err_new = _ss_res(u, v, b_new, s_new, E_new)
            if err_new < err:
                converged = err - err_new <= 1e-15 * max(err, 1e-300)
                err, E, b, s = err_new, E_new, b_new, s_new
                damping = max(damping / 10, 1e-12)
                improved = not converged
                break
            damping *= 10
        if not improved:
            break
    return err, E, b, s


def _fit(b: float, s: float, E: float | None, ss_res: float, v: np.ndarray) -> PowerLawFit:
    """``log L = b + s log x`` (plus ``E``) as a :class:`PowerLawFit`: ``alpha = -s``, ``x_c = exp(b / alpha)``."""
    alpha = -float(s)
    if alpha == 0:
        raise DataError("the fitted exponent is 0: y does not change with x, so x_c is undefined")
    with np.errstate(over="ignore", under="ignore"):
        x_c = float(np.exp(b / alpha))
    if not 0 < x_c < np.inf:
        raise DataError(f"the fitted x_c = e^{b / alpha:.4g} is beyond float64 (alpha={alpha:.4g}): rescale y (or x) "
                        "towards 1 and fit again")  # fmt: skip
    ss_tot = float(((v - v.mean()) ** 2).sum())
    return PowerLawFit(x_c, alpha, None if E is None else float(E), 1 - ss_res / ss_tot, len(v))
