"""Fit an explainable latency model per group and phase, and measure how wrong it is.

Model: latency = overhead + per_token * tokens + per_pair * token_pairs, least squares with
non-negative coefficients. Tokens are what a group processes at once (batch x length in
prefill, batch in decode); token pairs are the attention work (batch x length^2 in prefill,
batch x context in decode), used for stateful groups only. Error is reported on held-out grid
points (every other point, leave-one-out when the grid is small).
Pure Python + numpy.
"""
from __future__ import annotations

import numpy as np

from .profile import GroupProfile, Profile, ProfilePoint


def features(point: ProfilePoint, stateful: bool) -> list[float]:
    """[1, tokens, token pairs] of a grid point (token pairs only for stateful groups)."""
    tokens = point.batch * (point.length if point.phase == "prefill" else 1)
    pairs = point.batch * (point.length ** 2 if point.phase == "prefill" else point.length)
    return [1.0, float(tokens), float(pairs) if stateful else 0.0]


def fit_points(points: list[ProfilePoint], stateful: bool) -> np.ndarray:
    """Non-negative least-squares coefficients (drops a term whose coefficient goes negative)."""
    x = np.array([features(p, stateful) for p in points])
    y = np.array([p.median_s for p in points])
    active = [i for i in range(x.shape[1]) if x[:, i].any()]
    while True:
        coef = np.zeros(x.shape[1])
        solution, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        coef[active] = solution
        negative = [i for i in active if coef[i] < 0]
        if not negative or len(active) == 1:
            return np.clip(coef, 0.0, None)
        active.remove(min(negative, key=lambda i: coef[i]))


def predict(coef: np.ndarray, point: ProfilePoint, stateful: bool) -> float:
    """Predicted latency of a grid point."""
    return float(np.dot(coef, features(point, stateful)))


def fit_group(group: GroupProfile, stateful: bool) -> dict:
    """Fit each phase of one group; record coefficients and held-out errors."""
    result = {"model": "overhead + per_token*tokens + per_pair*token_pairs (NNLS)", "phases": {}}
    for phase in sorted({p.phase for p in group.points}):
        pts = [p for p in group.points if p.phase == phase]
        coef = fit_points(pts, stateful)
        errors = [abs(predict(fit_points(train, stateful), held, stateful) - held.median_s)
                  / held.median_s for held, train in _held_out(pts) if held.median_s > 0]
        result["phases"][phase] = {
            "overhead_s": coef[0], "per_token_s": coef[1], "per_pair_s": coef[2],
            "heldout_mape": float(np.median(errors)) if errors else None,
            "heldout_points": len(errors),
            "median_latency_s": float(np.median([p.median_s for p in pts]))}
    return result


def _held_out(points: list[ProfilePoint]):
    """(held-out point, training points) pairs: leave-one-out over the grid."""
    if len(points) < 4:
        return []
    return [(p, points[:i] + points[i + 1:]) for i, p in enumerate(points)]


def fit_profile(profile: Profile, stateful_groups: set[str]) -> Profile:
    """Attach a fitted model to every group of a profile (in place) and return it."""
    for group in profile.groups:
        group.fit = fit_group(group, group.name in stateful_groups or group.group in
                              stateful_groups)
    return profile
