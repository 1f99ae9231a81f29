import math

import pytest
import torch

from abcgpt.gates.gate import check_alpha, sample_scores, tent_gate


def test_known_values():
    # m = 0.25: reach = max(m, 1 - m) = 0.75. alpha = 0.625 is halfway: cos^2(pi/4) = 1/2.
    m = torch.tensor([0.25])
    assert tent_gate(0.625, m).item() == pytest.approx(0.5, abs=1e-6)
    assert tent_gate(0.25, m).item() == 1.0
    # alpha = 0.4375 is a quarter of the way: cos^2(pi/8)
    assert tent_gate(0.4375, m).item() == pytest.approx(math.cos(math.pi / 8) ** 2, abs=1e-6)
    # narrowness 0.5 halves the reach: alpha = 0.4375 is now halfway
    assert tent_gate(0.4375, m, narrowness=0.5).item() == pytest.approx(0.5, abs=1e-6)


def test_corners_silence_exactly_the_other_half():
    m = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    at_one, at_zero = tent_gate(1.0, m), tent_gate(0.0, m)
    assert torch.all(at_one[m < 0.5] == 0) and torch.all(at_one[m > 0.5] > 0)
    assert torch.all(at_zero[m > 0.5] == 0) and torch.all(at_zero[m < 0.5] > 0)


def test_specialists_ramp_to_their_own_corner():
    m = torch.tensor([0.0, 1.0])
    assert tent_gate(0.0, m).tolist() == [1.0, 0.0]
    assert tent_gate(1.0, m).tolist() == [0.0, 1.0]


def test_halfsies_are_zero_at_both_ends_and_peak_in_the_middle():
    m = torch.tensor([0.5])
    assert tent_gate(0.0, m).item() == 0.0
    assert tent_gate(1.0, m).item() == 0.0
    assert tent_gate(0.5, m).item() == 1.0


@pytest.mark.parametrize("m", [0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
def test_gate_rises_monotonically_towards_the_score(m):
    alphas = torch.linspace(0, 1, 201)
    g = tent_gate(alphas, torch.tensor([m])).squeeze(1)
    below, above = g[alphas <= m], g[alphas >= m]
    assert torch.all(below[1:] >= below[:-1])
    assert torch.all(above[1:] <= above[:-1])
    assert g.max().item() == pytest.approx(1.0, abs=1e-3) and g.min() >= 0


def test_narrower_gates_fire_over_less_of_the_dial():
    m = torch.rand(2000, generator=torch.Generator().manual_seed(1))
    alphas = torch.linspace(0, 1, 101)
    wide, narrow = tent_gate(alphas, m), tent_gate(alphas, m, narrowness=0.5)
    assert torch.all(narrow <= wide + 1e-7)
    assert (narrow == 0).float().mean() > (wide == 0).float().mean()


def test_per_row_alpha_matches_scalar_alpha_row_by_row():
    m = torch.rand(37, generator=torch.Generator().manual_seed(2))
    alphas = torch.tensor([0.0, 0.3, 0.5, 1.0])
    rows = tent_gate(alphas, m)
    assert rows.shape == (4, 37)
    for i, a in enumerate(alphas.tolist()):
        torch.testing.assert_close(rows[i], tent_gate(a, m), rtol=0, atol=1e-7)


def test_scores_are_reproducible_from_the_seed():
    a = sample_scores(100, torch.Generator().manual_seed(7))
    b = sample_scores(100, torch.Generator().manual_seed(7))
    c = sample_scores(100, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_scores_follow_beta_half_half():
    m = sample_scores(50_000, torch.Generator().manual_seed(3)).double()
    assert m.min() >= 0 and m.max() <= 1
    # U-shaped: the edges hold far more mass than the middle
    edges = ((m < 0.1) | (m > 0.9)).float().mean()
    middle = ((m > 0.4) & (m < 0.6)).float().mean()
    assert edges > 3 * middle
    # Kolmogorov-Smirnov against the arcsine CDF F(x) = 2/pi * asin(sqrt(x))
    x, _ = torch.sort(m)
    cdf = 2 / math.pi * torch.asin(torch.sqrt(x))
    n = len(x)
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max().item()
    assert ks < 1.63 / math.sqrt(n)  # the 1% critical value


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_alpha(alpha)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_alpha(torch.tensor([0.5, alpha]))


def test_alpha_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError):
        check_alpha("0.5")


@pytest.mark.parametrize("a", [0.3, 1.0, 2.0])
def test_scores_follow_beta_a_a_for_other_concentrations(a):
    """score_beta: Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)); at a = 1 it is uniform."""
    m = sample_scores(50_000, torch.Generator().manual_seed(4), concentration=a).double()
    assert m.mean().item() == pytest.approx(0.5, abs=0.01)
    assert m.var().item() == pytest.approx(1 / (4 * (2 * a + 1)), rel=0.03)
    if a == 1.0:  # Kolmogorov-Smirnov against U(0, 1), the 1% critical value
        x, _ = torch.sort(m)
        n = len(x)
        assert torch.maximum(torch.arange(1, n + 1) / n - x, x - torch.arange(n) / n).max().item() < 1.63 / math.sqrt(n)
    assert torch.equal(sample_scores(50, torch.Generator().manual_seed(4), a),
                       sample_scores(50, torch.Generator().manual_seed(4), a))  # reproducible from the seed
