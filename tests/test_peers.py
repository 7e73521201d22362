"""Federated PPO's peer mixture: weights and the mixture reference, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedrl_lightning.algorithms.fedppo.mixture import mixture_log_probs, product_weights, score_weights, uniform_weights


def test_uniform_weights_with_self_preference():
    torch.testing.assert_close(uniform_weights(3, 1, 0.5), torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(uniform_weights(4, 0), torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="self_preference"):
        uniform_weights(3, 0, 1.5)


def test_score_and_product_weights_by_hand():
    s = score_weights(torch.tensor([0.0, math.log(3.0)]), temperature=1.0)
    torch.testing.assert_close(s, torch.tensor([0.25, 0.75], dtype=torch.float64))
    # uniform (0.5, 0.5) x (0.25, 0.75) renormalised is the score vector; (0.8, 0.2) x (0.25, 0.75) = (0.2, 0.15)/0.35
    torch.testing.assert_close(
        product_weights(torch.tensor([0.8, 0.2]), s), torch.tensor([4 / 7, 3 / 7], dtype=torch.float64)
    )


def _three_peers():
    # one sequence, one position, vocabulary 2: peers' logits z_j, token 0 scored
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]).view(3, 1, 1, 2)
    return z, torch.tensor([[0]]), torch.tensor([0.5, 0.25, 0.25])


def test_mixture_in_logit_space_by_hand():
    z, tok, w = _three_peers()
    # Σ w z = [0.5, 1.0]; log softmax at token 0 = 0.5 - log(e^0.5 + e^1)
    expected = 0.5 - math.log(math.exp(0.5) + math.exp(1.0))
    assert mixture_log_probs(z, w, tok, "logits").item() == pytest.approx(expected, abs=1e-6)
    # temperature 2 halves every logit first: Σ w z / 2 = [0.25, 0.5]
    expected_t = 0.25 - math.log(math.exp(0.25) + math.exp(0.5))
    assert mixture_log_probs(z, w, tok, "logits", temperature=2.0).item() == pytest.approx(expected_t, abs=1e-6)


def test_mixture_in_probability_space_by_hand():
    z, tok, w = _three_peers()
    p0 = [0.5, math.exp(2) / (math.exp(2) + 1), 1 / (1 + math.exp(4))]  # each peer's P(token 0)
    expected = math.log(0.5 * p0[0] + 0.25 * p0[1] + 0.25 * p0[2])
    assert mixture_log_probs(z, w, tok, "probs").item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("space", ["logits", "probs"])
def test_self_preference_one_gives_the_clients_own_snapshot(space):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 4, 7, generator=gen)
    tokens = torch.randint(0, 7, (2, 4), generator=gen)
    own = torch.log_softmax(z[1] / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ref = mixture_log_probs(z, uniform_weights(3, 1, 1.0), tokens, space, temperature=0.7)
    torch.testing.assert_close(ref, own)
