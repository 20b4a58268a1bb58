"""Paired comparison of two models over seeds: mean difference, 95% confidence interval, paired t-test.

Seed s of both models shares its data order and augmentation, so the per-seed differences are the
honest unit (a paired test). The Student t distribution is computed here (regularised incomplete beta
by continued fraction) rather than importing scipy for two functions.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: int) -> float:
    """Two-sided tail probability P(|T| >= |t|) of Student's t with ``df`` degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p, for p in (0.5, 1): by bisection on the two-sided tail."""
    target, lo, hi = 2.0 * (1.0 - p), 0.0, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_sf2(mid, df) > target else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Paired:
    n: int
    mean: float  # mean of (a - b) over the paired seeds
    std: float
    ci95: tuple[float, float] | None  # None with fewer than 2 pairs
    p: float | None  # paired t-test, two-sided

    def describe(self) -> str:
        """``+0.12 ± 0.20, 95% CI [-0.3, +0.5], p = 0.41 (n = 3)``: one table cell."""
        if self.ci95 is None:
            return f"{self.mean:+.2f} (n = {self.n}, no test)"
        p = "n/a" if self.p is None else (f"{self.p:.3f}" if self.p >= 0.001 else "< 0.001")
        return (f"{self.mean:+.2f} ± {self.std:.2f}, 95% CI [{self.ci95[0]:+.2f}, {self.ci95[1]:+.2f}], "
                f"p = {p} (n = {self.n})")


def paired(a: dict[int, float], b: dict[int, float]) -> Paired | None:
    """Paired statistics of a - b over the seeds both have (None when they share none)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    n, mean = len(diffs), statistics.mean(diffs)
    if n < 2:
        return Paired(n, mean, 0.0, None, None)
    std = statistics.stdev(diffs)
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    p = None if std == 0 else t_sf2(mean / (std / math.sqrt(n)), n - 1)
    return Paired(n, mean, std, (mean - half, mean + half), p)
