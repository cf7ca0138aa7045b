"""Confidence intervals of compare.py's figures, in plain Python (no scipy).

mean_interval, perplexity_interval, paired_relative_difference, wilson_interval and paired_accuracy_difference
return a *figure*:
{"mean": float, "ci_low": float | None, "ci_high": float | None, "n": int} (docs/results_schema.md); `level`
is the two-sided coverage (0.95: a 95% interval). Intervals over windows are Student t intervals rather than a
bootstrap: with the few windows a run affords (4-8), a bootstrap over windows has few distinct resamples and
comes out too narrow, while the t interval accounts for the small n.
"""

import math
from statistics import NormalDist


def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer number df >= 1 of degrees of freedom, t >= 0.

    The closed form of Abramowitz & Stegun 26.7.3-4, with theta = atan(t / sqrt(df)) and c = cos(theta)^2:
      df odd:  2/pi * (theta + sin(theta) cos(theta) * (1 + 2/3 c + 2*4/(3*5) c^2 + ... up to c^((df-3)/2)))
               (df = 1: 2/pi * theta)
      df even: sin(theta) * (1 + 1/2 c + 1*3/(2*4) c^2 + ... up to c^((df-2)/2))
    """
    theta = math.atan(t / math.sqrt(df))
    c = math.cos(theta) ** 2
    series, term = 1.0, 1.0
    if df % 2 == 1:
        for j in range(1, (df - 3) // 2 + 1):
            term *= c * (2 * j) / (2 * j + 1)
            series += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0))
    for j in range(1, (df - 2) // 2 + 1):
        term *= c * (2 * j - 1) / (2 * j)
        series += term
    return math.sin(theta) * series


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = level for Student's t with df degrees of freedom: the multiplier of a
    two-sided `level` interval (level 0.95, df 3: 3.182). Bisection on t_cdf_two_sided to 1e-12."""
    if not 0 < level < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < level < 1 and df >= 1, got level={level}, df={df}")
    low, high = 0.0, 1.0
    while t_cdf_two_sided(high, df) < level:
        low, high = high, 2 * high
    while high - low > 1e-12 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf_two_sided(middle, df) < level else (low, middle)
    return (low + high) / 2


def figure(mean: float, ci_low: float | None, ci_high: float | None, n: int) -> dict:
    return {"mean": mean, "ci_low": ci_low, "ci_high": ci_high, "n": n}


def mean_interval(values, level: float = 0.95) -> dict:
    """Mean of n values and its t interval: mean ± t_{n-1} * s / sqrt(n), where
    s^2 = sum (x - mean)^2 / (n - 1) and t_{n-1} = t_quantile(level, n - 1).

    n = 1: ci_low = ci_high = None (one value has no spread to estimate). ValueError for n = 0.
    """
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval of no values")
    mean = sum(values) / n
    if n == 1:
        return figure(mean, None, None, 1)
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(level, n - 1) * s / math.sqrt(n)
    return figure(mean, mean - half, mean + half, n)


def perplexity_interval(window_nll, level: float = 0.95) -> dict:
    """Perplexity over equal-length windows from their mean next-token NLLs x_1..x_n:
    mean = exp(mean of x_i), which is exp(mean NLL over every position of all windows) since the windows
    have the same number of positions; interval = exp of the t interval of the x_i (mean_interval).
    n = 1: ci_low = ci_high = None."""
    nll = mean_interval(window_nll, level)
    return figure(
        math.exp(nll["mean"]),
        None if nll["ci_low"] is None else math.exp(nll["ci_low"]),
        None if nll["ci_high"] is None else math.exp(nll["ci_high"]),
        nll["n"],
    )


def paired_relative_difference(dsa_values, dense_values, level: float = 0.95) -> dict:
    """DSA vs dense, paired on the same windows: per window i the relative difference
    d_i = dsa_i / dense_i - 1 (for perplexity: the two perplexities of window i), then the t interval of
    the d_i (mean_interval): mean(d) ± t_{n-1} * sd(d) / sqrt(n). Pairing removes the window-to-window
    spread that both sides share, so the interval is much narrower than the per-side intervals suggest.
    n = 1: ci_low = ci_high = None. ValueError for lists of different lengths.
    """
    dsa_values, dense_values = list(dsa_values), list(dense_values)
    if len(dsa_values) != len(dense_values):
        raise ValueError(f"paired values need equal lengths, got {len(dsa_values)} and {len(dense_values)}")
    return mean_interval([a / b - 1 for a, b in zip(dsa_values, dense_values)], level)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> dict:
    """Accuracy p = successes / n with its Wilson score interval:
    (p + z^2/(2n) ± z * sqrt(p(1-p)/n + z^2/(4n^2))) / (1 + z^2/n), z the standard normal quantile at
    (1 + level) / 2 (1.96 for 0.95). Unlike p ± z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty
    at p = 0 or 1 (there the formula gives exactly 0, resp. 1, set without rounding noise).
    ValueError unless 0 <= successes <= n and n >= 1.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n >= 1, got {successes}/{n}")
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else center - half
    high = 1.0 if successes == n else center + half
    return figure(p, low, high, n)


def paired_accuracy_difference(outcomes, baseline, level: float = 0.95) -> dict:
    """p1 - p2 for 0/1 outcomes of two sides on the same n samples, with Newcombe's interval for paired
    proportions (Newcombe 1998, Statistics in Medicine 17:2635, method 10; Altman et al., "Statistics with
    confidence", 2000). With a = both 1, b = outcomes 1 and baseline 0, c = outcomes 0 and baseline 1, d = both 0:
    p1 = (a + b) / n, p2 = (a + c) / n, [l1, u1] and [l2, u2] their Wilson intervals, and
    phi = C / sqrt((a+b)(c+d)(a+c)(b+d)) with C = ad - bc - n/2 if ad - bc > n/2, ad - bc if ad - bc < 0, else 0
    (phi = 0 when the denominator is 0):
      low  = (p1 - p2) - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
      high = (p1 - p2) + sqrt((p2 - l2)^2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)^2)
    Unlike a t interval over the per-sample differences, it is not empty when every pair agrees (20/20 on both
    sides: [-0.16, +0.16]). ValueError for lists of different lengths, empty, or values other than 0 and 1.
    """
    pairs = list(zip(outcomes, baseline))
    if len(pairs) != len(outcomes) or len(pairs) != len(baseline) or not pairs:
        raise ValueError(f"paired outcomes need equal, non-zero lengths, got {len(outcomes)} and {len(baseline)}")
    if any(x not in (0, 1) or y not in (0, 1) for x, y in pairs):
        raise ValueError("paired_accuracy_difference needs 0/1 outcomes")
    n = len(pairs)
    a = sum(1 for x, y in pairs if x and y)
    b = sum(1 for x, y in pairs if x and not y)
    c = sum(1 for x, y in pairs if not x and y)
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    w1, w2 = wilson_interval(a + b, n, level), wilson_interval(a + c, n, level)
    l1, u1, l2, u2 = w1["ci_low"], w1["ci_high"], w2["ci_low"], w2["ci_high"]
    cross = a * d - b * c
    C = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    phi = C / math.sqrt(denominator) if denominator else 0.0
    low = p1 - p2 - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    high = p1 - p2 + math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    return figure(p1 - p2, low, high, n)


def excludes_zero(fig: dict | None) -> bool:
    """Whether a figure's interval lies entirely above or below 0 (False without an interval)."""
    return fig is not None and fig["ci_low"] is not None and (fig["ci_low"] > 0 or fig["ci_high"] < 0)
