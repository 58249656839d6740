"""Fit an explainable latency model per group and phase, and measure how wrong it is.

Model (per group and phase):

    latency = overhead + per_token * T + extra_per_token * max(0, T - knot) + per_pair * P

T is the number of tokens a group processes at once (batch x length in prefill, batch in
decode); P the attention work (batch x length^2 in prefill, batch x context in decode), used
for stateful groups only. The hinge lets the per-token cost change once, at `knot` (one of the
grid's token counts, chosen by fit): GEMMs read their weights at any size, and turn from
memory- to compute-bound as tokens grow. Fitted by least squares on relative error (the
error we report), with non-negative overhead, per-token and per-pair terms. Error is
reported on held-out grid points (leave-one-out). Pure Python + numpy.
"""
from __future__ import annotations

import numpy as np

from fxscale.contracts.profile import GroupProfile, Profile, ProfilePoint

TERMS = ("overhead_s", "per_token_s", "extra_per_token_s", "per_pair_s")
NON_NEGATIVE = (0, 1, 3)


def tokens_and_pairs(point: ProfilePoint) -> tuple[float, float]:
    """(tokens, token pairs) a grid point puts through a group."""
    if point.phase == "prefill":
        return float(point.batch * point.length), float(point.batch * point.length ** 2)
    return float(point.batch), float(point.batch * point.length)


def features(point: ProfilePoint, stateful: bool, knot: float) -> list[float]:
    """[1, T, max(0, T - knot), P] of a grid point (P only for stateful groups)."""
    tokens, pairs = tokens_and_pairs(point)
    return [1.0, tokens, max(0.0, tokens - knot), pairs if stateful else 0.0]


def _solve(points: list[ProfilePoint], stateful: bool, knot: float) -> tuple[np.ndarray, float]:
    """Coefficients minimising squared relative error, and that error."""
    x = np.array([features(p, stateful, knot) for p in points])
    y = np.array([p.median_s for p in points])
    weights = 1.0 / np.maximum(y, 1e-12)
    active = [i for i in range(x.shape[1]) if x[:, i].any()]
    while True:
        coef = np.zeros(x.shape[1])
        solution, *_ = np.linalg.lstsq(x[:, active] * weights[:, None], y * weights, rcond=None)
        coef[active] = solution
        negative = [i for i in active if i in NON_NEGATIVE and coef[i] < 0]
        if not negative or len(active) == 1:
            break
        active.remove(min(negative, key=lambda i: coef[i]))
    error = float(np.sum(((x @ coef - y) * weights) ** 2))
    return coef, error


def fit_points(points: list[ProfilePoint], stateful: bool) -> tuple[np.ndarray, float]:
    """Best coefficients over the candidate knots (inner token counts of the grid): (coef, knot)."""
    counts = sorted({tokens_and_pairs(p)[0] for p in points})
    knots = counts[1:-1] if len(points) > 4 and len(counts) > 2 else [counts[-1]]
    best = min(((*_solve(points, stateful, k), k) for k in knots), key=lambda r: r[1])
    return best[0], best[2]


def predict(coef: np.ndarray, knot: float, point: ProfilePoint, stateful: bool) -> float:
    """Predicted latency of a grid point."""
    return float(np.dot(coef, features(point, stateful, knot)))


def fit_group(group: GroupProfile, stateful: bool) -> dict:
    """Fit each phase of one group; record coefficients and held-out errors."""
    result = {"model": "overhead + per_token*T + extra_per_token*max(0, T-knot) + per_pair*P",
              "phases": {}}
    for phase in sorted({p.phase for p in group.points}):
        pts = [p for p in group.points if p.phase == phase]
        coef, knot = fit_points(pts, stateful)
        errors = []
        for i, held in enumerate(pts if len(pts) >= 4 else []):
            if held.median_s <= 0:
                continue  # a zero reading has no relative error
            train = pts[:i] + pts[i + 1:]
            c, k = fit_points(train, stateful)
            errors.append(abs(predict(c, k, held, stateful) - held.median_s) / held.median_s)
        result["phases"][phase] = {
            **{term: float(value) for term, value in zip(TERMS, coef)}, "knot_tokens": knot,
            "heldout_mape": float(np.median(errors)) if errors else None,
            "heldout_points": len(errors),
            "median_latency_s": float(np.median([p.median_s for p in pts]))}
    return result


def fit_profile(profile: Profile) -> Profile:
    """Attach a fitted model to every group of a profile (in place) and return it."""
    for group in profile.groups:
        group.fit = fit_group(group, group.stateful)
    return profile
