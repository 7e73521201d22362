"""The final summary table: 95% Wilson intervals on held-out accuracy."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from fedrl_lightning.reporting import print_summary
from fedrl_lightning.stats import discordant_pairs, mcnemar_exact, wilson_interval


@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [
        # scipy.stats.binomtest(k, n).proportion_ci(method="wilson") (its z is 1.95996..., ours 1.96: 1e-5 apart)
        (8, 64, (0.06472, 0.22775)),
        (0, 16, (0.0, 0.19361)),  # z^2 / (n + z^2): the upper end stays informative at zero successes
        (16, 16, (0.80639, 1.0)),
        (32, 64, (0.38102, 0.61898)),
    ],
)
def test_wilson_interval_known_values(successes, n, expected):
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(expected[0], abs=1e-5)
    assert high == pytest.approx(expected[1], abs=1e-5)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0.125 * 64, 64) == wilson_interval(8, 64)  # an accuracy times n rounds to the count
    low, high = wilson_interval(3, 10, z=0.0)
    assert low == high == pytest.approx(0.3)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


@pytest.mark.parametrize(
    ("b", "c", "expected"),
    [
        # scipy.stats.binomtest(b, b + c, 0.5).pvalue (two-sided), checked to 1e-15 on 3000 random (b, c) up to 300
        (10, 2, 0.0385742),  # 2 * (1 + 12 + 66) / 2**12
        (2, 10, 0.0385742),  # symmetric
        (5, 0, 0.0625),  # 2 / 2**5: five discordant pairs all one way are not yet significant
        (0, 6, 0.03125),
        (7, 7, 1.0),
        (3, 12, 0.0351562),
        (40, 20, 0.0134893),
        (1000, 900, 0.0231088),  # large n: exact integers, no underflow
    ],
)
def test_mcnemar_exact_known_values(b, c, expected):
    assert mcnemar_exact(b, c) == pytest.approx(expected, abs=1e-7)


def test_mcnemar_exact_edges():
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pair: no evidence either way
    assert mcnemar_exact(1, 0) == 1.0  # capped at 1
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_discordant_pairs():
    first = [1, 1, 0, 0, 1, True, False]
    second = [1, 0, 1, 0, 0, False, False]
    assert discordant_pairs(first, second) == (3, 1)
    assert discordant_pairs(second, first) == (1, 3)
    b, c = discordant_pairs(first, second)  # the accuracy difference is (b - c) / n
    assert (sum(map(int, first)) - sum(map(int, second))) / len(first) == pytest.approx((b - c) / len(first))
    with pytest.raises(ValueError):
        discordant_pairs([1, 0], [1])


def test_summary_prints_intervals_and_pooled_mean():
    history = [
        {"round": 0, "client0/eval/accuracy": 0.125, "client0/eval/reward": 0.1, "client1/eval/accuracy": 0.0,
         "client1/eval/reward": 0.0, "eval/accuracy_mean": 0.0625, "eval/reward_mean": 0.05},
        {"round": 3, "client0/eval/accuracy": 0.5, "client0/eval/reward": 0.6, "client1/eval/accuracy": 0.25,
         "client1/eval/reward": 0.3, "eval/accuracy_mean": 0.375, "eval/reward_mean": 0.45},
    ]  # fmt: skip
    out = io.StringIO()
    print_summary(Console(file=out, width=200), history, [0, 1], eval_sizes={0: 64, 1: 64})
    text = out.getvalue()
    assert "0.125 [0.06, 0.23]" in text and "0.000 [0.00, 0.06]" in text
    lo, hi = wilson_interval(8, 128)  # the mean row pools 128 prompts: 8 + 0 correct before
    assert f"0.062 [{lo:.2f}, {hi:.2f}]" in text
    lo, hi = wilson_interval(48, 128)  # 32 + 16 after
    assert f"0.375 [{lo:.2f}, {hi:.2f}]" in text
    plain = io.StringIO()
    print_summary(Console(file=plain, width=200), history, [0, 1])  # without sizes: the accuracies alone
    assert "0.125" in plain.getvalue() and "[" not in plain.getvalue()


def test_summary_of_many_clients_shows_the_evaluated_ones_up_to_a_limit():
    from fedrl_lightning.reporting import MAX_CLIENT_ROWS

    n = MAX_CLIENT_ROWS + 8
    ids = list(range(1000))  # only the first n hold a held-out set
    rows = [{"round": r, "eval/accuracy_mean": 0.5, "eval/reward_mean": 0.5} for r in (0, 3)]
    for row in rows:
        row.update({f"client{c}/eval/accuracy": 0.5 for c in range(n)})
    out = io.StringIO()
    print_summary(Console(file=out, width=200), rows, ids, eval_sizes={c: 2 for c in range(n)})
    text = out.getvalue()
    assert f"{MAX_CLIENT_ROWS} of {n} evaluated clients shown" in text
    first_cells = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    assert first_cells[0] == "0" and first_cells[MAX_CLIENT_ROWS - 1] == str(MAX_CLIENT_ROWS - 1)
    assert first_cells[MAX_CLIENT_ROWS:] == ["mean"]
    mean_row = next(line for line in text.splitlines() if line.startswith("│") and "mean" in line.split("│")[1])
    assert mean_row.split("│")[2].strip() == str(2 * n)  # the mean row pools every evaluated client's prompts


def test_summary_is_left_out_when_no_client_was_evaluated():
    history = [{"round": 3, "eval/accuracy_mean": math.nan, "eval/reward_mean": math.nan}]
    out = io.StringIO()
    print_summary(Console(file=out, width=200), history, list(range(1000)), eval_sizes={})
    assert out.getvalue() == ""
