"""The dial as one value (abcgpt/gates/voice.py): the training draws, parsing a voice, uniform mode."""
import math

import pytest
import torch

from abcgpt.core.errors import SettingsError
from abcgpt.gates.voice import UNIFORM, Dial, as_dial, draw, evaluation_settings, parse_voice

NAMES = ["bible", "jungle", "aesop"]


def test_the_line_draw_is_the_reference_recipe():
    dial, sources = draw(200_000, 2, "line", torch.Generator().manual_seed(3))
    alphas = dial.point.double()
    # Beta(0.5, 0.5): mean 1/2, variance 1/8
    assert alphas.mean().item() == pytest.approx(0.5, abs=0.005)
    assert alphas.var().item() == pytest.approx(0.125, abs=0.002)
    for lo in (0.0, 0.3, 0.6, 0.9):  # P(source 1 | alpha) = alpha, on bins of alpha
        in_bin = (alphas >= lo) & (alphas < lo + 0.1)
        assert sources[in_bin].double().mean().item() == pytest.approx(alphas[in_bin].mean().item(), abs=0.02)


def test_the_line_with_three_sources_mixes_only_neighbours():
    dial, sources = draw(50_000, 3, "line", torch.Generator().manual_seed(4))
    near_first = dial.point < 0.5
    assert set(sources[near_first].tolist()) <= {0, 1} and set(sources[~near_first].tolist()) <= {1, 2}


@pytest.mark.parametrize("n", [2, 5])
def test_the_simplex_draw_is_dirichlet_then_categorical(n):
    dial, sources = draw(200_000, n, "pool", torch.Generator().manual_seed(5))
    w = dial.point.double()
    assert dial.mixture and w.shape == (200_000, n) and torch.allclose(w.sum(-1), torch.ones(200_000, dtype=w.dtype))
    # Dirichlet(1/2, ..., 1/2): each weight has mean 1/n and variance (1/n)(1 - 1/n) / (n/2 + 1)
    assert w.mean(0).tolist() == pytest.approx([1 / n] * n, abs=0.005)
    assert w[:, 0].var().item() == pytest.approx((1 / n) * (1 - 1 / n) / (n / 2 + 1), rel=0.03)
    # source ~ Categorical(weights): P(source 0 | w_0) = w_0, on bins of w_0
    for lo in (0.0, 0.4, 0.8):
        in_bin = (w[:, 0] >= lo) & (w[:, 0] < lo + 0.1)
        assert (sources[in_bin] == 0).double().mean().item() == pytest.approx(w[in_bin, 0].mean().item(), abs=0.02)
    if n == 2:  # the two-source case is the line's law: Beta(1/2, 1/2)
        assert w[:, 1].var().item() == pytest.approx(0.125, abs=0.002)


def test_uniform_mode_takes_its_share_and_draws_sources_evenly():
    dial, sources = draw(100_000, 4, "simplex", torch.Generator().manual_seed(6), uniform_share=0.25)
    assert dial.uniform.double().mean().item() == pytest.approx(0.25, abs=0.01)
    counts = torch.bincount(sources[dial.uniform], minlength=4).double()
    assert (counts / counts.sum()).tolist() == pytest.approx([0.25] * 4, abs=0.01)


def test_voices_parse_to_their_settings():
    dial, label = parse_voice("jungle", NAMES, "pool")
    assert label == "jungle" and dial.point.tolist() == [0.0, 1.0, 0.0] and dial.uniform is None
    dial, label = parse_voice("bible=1, aesop=3", NAMES, "pool")
    assert dial.point.tolist() == [0.25, 0.0, 0.75] and label == "bible=1,aesop=3"
    dial, label = parse_voice(UNIFORM, NAMES, "pool")
    assert label == UNIFORM and dial.uniform.item() is True
    # on the line a source is its alpha, and a mixture sits at its weighted mean place
    assert parse_voice("aesop", NAMES, "line")[0].point.item() == 1.0
    assert parse_voice("bible=1,jungle=1", NAMES, "line")[0].point.item() == pytest.approx(0.25)


@pytest.mark.parametrize("text, words", [
    ("psalms", "no source named 'psalms'"),
    ("bible=-1,jungle=2", "not negative"),
    ("bible=0,jungle=0", "sum to a positive number"),
    ("bible=x", "must be a number"),
    ("bible=nan", "finite"),
    ("bible=1,jungle", "NAME=WEIGHT"),
])
def test_a_bad_voice_is_one_clear_error(text, words):
    with pytest.raises(SettingsError, match=words):
        parse_voice(text, NAMES, "pool")


def test_a_line_alpha_is_refused_on_a_mixture_dial_and_the_other_way_round():
    with pytest.raises(SettingsError, match="mixture of its sources"):
        as_dial(0.5, "pool")
    with pytest.raises(SettingsError, match="takes an alpha"):
        as_dial(Dial.source(0, "pool", 3), "line")
    assert as_dial(0.25, "line").point.item() == 0.25


def test_evaluation_settings_visit_every_source_and_uniform_mode():
    labels = [label for label, _ in evaluation_settings(NAMES, "tent")]
    assert labels == NAMES + [UNIFORM]
    assert [label for label, _ in evaluation_settings(NAMES[:2], "line")] == ["0", "0.5", "1"]
    assert math.isclose(evaluation_settings(NAMES[:2], "line")[1][1].point.item(), 0.5)


def test_a_lower_concentration_puts_training_dials_nearer_the_vertices():
    near = draw(50_000, 5, "pool", torch.Generator().manual_seed(7), concentration=0.2)[0].point.double()
    spread = draw(50_000, 5, "pool", torch.Generator().manual_seed(7))[0].point.double()
    assert near.mean(0).tolist() == pytest.approx([0.2] * 5, abs=0.01)
    # Dirichlet(c, ..., c) over 5: each weight's variance is (1/5)(4/5) / (5c + 1)
    assert near[:, 0].var().item() == pytest.approx(0.16 / 2.0, rel=0.05)
    assert near.max(-1).values.mean() > spread.max(-1).values.mean() + 0.1
