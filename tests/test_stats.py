"""dsa.stats against hand computations: t quantiles, t intervals, the perplexity interval, the paired
difference and the Wilson interval. The arithmetic is written next to each expected number."""

import math

import pytest

from dsa.stats import (
    excludes_zero,
    mean_interval,
    paired_accuracy_difference,
    paired_relative_difference,
    perplexity_interval,
    t_cdf_two_sided,
    t_quantile,
    wilson_interval,
)

Z = 1.959964  # standard normal quantile at 0.975
T2, T3 = 4.302653, 3.182446  # t quantiles at 0.975, 2 and 3 degrees of freedom (printed tables)


def test_t_distribution_matches_printed_tables():
    assert t_cdf_two_sided(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| <= 1) = 2 atan(1) / pi = 1/2
    assert t_cdf_two_sided(math.sqrt(2), 2) == pytest.approx(math.sqrt(0.5))  # df 2: t / sqrt(2 + t^2) = sqrt2 / 2
    # two-sided 95% multipliers t_{0.975, df}
    for df, expected in ((1, 12.7062), (2, T2), (3, T3), (9, 2.2622), (30, 2.0423), (120, 1.9799)):
        assert t_quantile(0.95, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.99, 5) == pytest.approx(4.0321, abs=1e-4)  # t_{0.995, 5}
    with pytest.raises(ValueError):
        t_quantile(0.95, 0)


def test_mean_interval_by_hand():
    # 1, 2, 3, 6: mean 3; squared deviations 4 + 1 + 0 + 9 = 14; s = sqrt(14 / 3) = 2.160247;
    # s / sqrt(4) = 1.080123; half width 3.182446 * 1.080123 = 3.437435
    fig = mean_interval([1, 2, 3, 6])
    assert fig["n"] == 4 and fig["mean"] == pytest.approx(3.0)
    assert fig["ci_low"] == pytest.approx(3 - 3.437435, abs=1e-5) and fig["ci_high"] == pytest.approx(3 + 3.437435, abs=1e-5)
    # 2, 4, 9: mean 5; squared deviations 9 + 1 + 16 = 26; s = sqrt(13) = 3.605551; s / sqrt(3) = 2.081666;
    # half width 4.302653 * 2.081666 = 8.956686
    fig = mean_interval([2, 4, 9])
    assert (fig["ci_low"], fig["mean"], fig["ci_high"]) == pytest.approx((5 - 8.956686, 5, 5 + 8.956686), abs=1e-5)
    # equal values: no spread, a zero-width interval
    assert mean_interval([0.5, 0.5, 0.5]) == {"mean": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 3}


def test_one_value_has_no_interval():
    assert mean_interval([7.0]) == {"mean": 7.0, "ci_low": None, "ci_high": None, "n": 1}
    assert paired_relative_difference([11.0], [10.0]) == pytest.approx({"mean": 0.1, "ci_low": None, "ci_high": None, "n": 1})
    assert perplexity_interval([2.0])["ci_low"] is None
    with pytest.raises(ValueError):
        mean_interval([])


def test_perplexity_interval_by_hand():
    # per-window mean NLL 1, 2, 3: mean 2, s = 1, s / sqrt(3) = 0.577350, half width 4.302653 * 0.577350 = 2.484138;
    # perplexity exp(2) = 7.389056 in [exp(-0.484138), exp(4.484138)] = [0.616228, 88.6005]
    fig = perplexity_interval([1.0, 2.0, 3.0])
    assert fig["n"] == 3 and fig["mean"] == pytest.approx(7.389056)
    assert fig["ci_low"] == pytest.approx(0.616228, rel=1e-5) and fig["ci_high"] == pytest.approx(88.6005, rel=1e-5)
    # equal-length windows: exp(mean of the window means) = exp(mean NLL over every position)
    windows = [[1.0, 3.0], [2.0, 4.0]]
    positions = [x for w in windows for x in w]
    assert perplexity_interval([sum(w) / 2 for w in windows])["mean"] == pytest.approx(math.exp(sum(positions) / 4))


def test_paired_difference_is_decisive_where_the_unpaired_intervals_overlap():
    dense = [10.0, 20.0, 30.0, 40.0]  # four windows of very different difficulty
    dsa = [10.2, 20.5, 30.6, 40.9]  # DSA a little worse on every one of them
    # unpaired: each side's interval holds the other's mean, and the difference of the means, 25.55 - 25 = 0.55,
    # has standard error sqrt(166.667 / 4 + 174.083 / 4) = 9.2297 (sample variances of the two columns):
    # 0.55 +- 3.18 * 9.23 includes 0 by far
    a, b = mean_interval(dsa), mean_interval(dense)
    assert a["ci_low"] < b["mean"] < a["ci_high"] and b["ci_low"] < a["mean"] < b["ci_high"]
    assert 0.55 - T3 * 9.2297 < 0 < 0.55 + T3 * 9.2297
    # paired: d = 0.02, 0.025, 0.02, 0.0225; mean 0.021875; deviations -0.001875, 0.003125, -0.001875, 0.000625;
    # squared 3.515625e-6 + 9.765625e-6 + 3.515625e-6 + 0.390625e-6 = 17.1875e-6; s^2 = 5.729167e-6, s = 0.00239357;
    # s / sqrt(4) = 0.00119678; half width 3.182446 * 0.00119678 = 0.00380870
    fig = paired_relative_difference(dsa, dense)
    assert fig["n"] == 4 and fig["mean"] == pytest.approx(0.021875)
    assert fig["ci_low"] == pytest.approx(0.021875 - 0.0038087, abs=1e-6)
    assert fig["ci_high"] == pytest.approx(0.021875 + 0.0038087, abs=1e-6)
    assert fig["ci_low"] > 0 and excludes_zero(fig)
    with pytest.raises(ValueError):
        paired_relative_difference([1.0, 2.0], [1.0])


def test_wilson_interval_by_hand():
    # z^2 = 3.841459; 1 + z^2 / 10 = 1.3841459
    # 7/10: center (0.7 + 3.841459 / 20) / 1.3841459 = 0.8920729 / 1.3841459 = 0.644493;
    #       half 1.959964 * sqrt(0.7 * 0.3 / 10 + 3.841459 / 400) / 1.3841459 = 1.959964 * 0.174939 / 1.3841459 = 0.247715
    fig = wilson_interval(7, 10)
    assert fig["mean"] == 0.7 and fig["n"] == 10
    assert fig["ci_low"] == pytest.approx(0.644493 - 0.247715, abs=2e-6) and fig["ci_high"] == pytest.approx(0.644493 + 0.247715, abs=2e-6)
    # 0/10: center 0.1920729 / 1.3841459 = 0.138767 = half (1.959964 * sqrt(3.841459 / 400) / 1.3841459) -> [0, 0.277533]
    assert wilson_interval(0, 10) == pytest.approx({"mean": 0.0, "ci_low": 0.0, "ci_high": 0.277533, "n": 10}, abs=2e-6)
    # 10/10: the mirror image, [1 - 0.277533, 1]
    assert wilson_interval(10, 10) == pytest.approx({"mean": 1.0, "ci_low": 0.722467, "ci_high": 1.0, "n": 10}, abs=2e-6)
    # one trial, a failure: [0, z^2 / (1 + z^2)] = [0, 3.841459 / 4.841459] = [0, 0.793451]
    assert wilson_interval(0, 1)["ci_high"] == pytest.approx(0.793451, abs=2e-6)
    for successes, n in ((11, 10), (-1, 10), (0, 0)):
        with pytest.raises(ValueError):
            wilson_interval(successes, n)


def test_paired_accuracy_difference_by_hand():
    # Wilson at n = 10 (test above): 7/10 -> [0.396778, 0.892208], 10/10 -> [0.722467, 1]
    # every pair 1/1: phi = 0 (a margin is empty), [-(1 - 0.722467), +(1 - 0.722467)]: not empty, unlike a t interval
    same = paired_accuracy_difference([1] * 10, [1] * 10)
    assert same == pytest.approx({"mean": 0.0, "ci_low": -0.277533, "ci_high": 0.277533, "n": 10}, abs=2e-6)
    # 7/10 vs 10/10 (a=7, c=3): low = -0.3 - (0.7 - 0.396778); high = -0.3 + sqrt(0.277533^2 + 0.192208^2) = -0.3 + 0.337592
    worse = paired_accuracy_difference([1] * 7 + [0] * 3, [1] * 10)
    assert worse == pytest.approx({"mean": -0.3, "ci_low": -0.603222, "ci_high": 0.037592, "n": 10}, abs=2e-5)
    # a=6, b=1, c=1, d=2: ad - bc = 11 > n/2, C = 6, phi = 6 / sqrt(7*3*7*3) = 0.285714;
    # half width sqrt(0.303222^2 - 2 * 0.285714 * 0.303222 * 0.192208 + 0.192208^2) = sqrt(0.0955836) = 0.309166
    x, y = [1] * 6 + [1, 0] + [0, 0], [1] * 6 + [0, 1] + [0, 0]
    assert paired_accuracy_difference(x, y) == pytest.approx({"mean": 0.0, "ci_low": -0.309166, "ci_high": 0.309166, "n": 10}, abs=2e-5)
    for bad in (([1, 0], [1]), ([], []), ([1, 2], [1, 1])):
        with pytest.raises(ValueError):
            paired_accuracy_difference(*bad)


def test_excludes_zero():
    assert excludes_zero({"mean": 0.02, "ci_low": 0.01, "ci_high": 0.03, "n": 4})
    assert excludes_zero({"mean": -0.02, "ci_low": -0.03, "ci_high": -0.01, "n": 4})
    assert not excludes_zero({"mean": 0.02, "ci_low": -0.01, "ci_high": 0.05, "n": 4})
    assert not excludes_zero({"mean": 0.02, "ci_low": None, "ci_high": None, "n": 1})
    assert not excludes_zero(None)
