"""The folded backend: one alpha folded into the weights and silent units cut, against the reference."""
import pytest
import torch
from conftest import SMALL_GPT
from conftest import token_batch as batch
from conftest import twin_models as twins

from abcgpt.backends.folded import Folded, active_ranges, folding_state
from abcgpt.gates.gate import gates_for
from abcgpt.model.attention import KVCache
from abcgpt.model.gpt import GPT, GPTConfig
from abcgpt.model.sampling import Generation, generate

CONFIG = SMALL_GPT
ALPHAS = [0.0, 1.0, 0.5, 0.137, 0.81]


def twin_models(**overrides):
    """A folded-backend model and a reference-backend copy with the same weights."""
    return twins("folded", **{**CONFIG, **overrides})


def folded_at(model, alpha, skip=True):
    """The folded executor at one alpha, cutting silent units (skip) or keeping every unit."""
    gates = gates_for(torch.tensor(alpha), model.scores(), model.config.narrowness)
    return Folded(model, gates, active_ranges(model, alpha if skip else None, gates))


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("overrides", [{}, {"bias": True, "narrowness": 0.6}, {"sort_units": False}],
                         ids=["default", "bias-narrow", "unsorted"])
def test_folded_equals_reference(alpha, overrides):
    folded, reference = twin_models(**overrides)
    idx = batch()
    f_logits, f_loss = folded(idx, alpha, idx)
    r_logits, r_loss = reference(idx, alpha, idx)
    torch.testing.assert_close(f_logits, r_logits, rtol=1e-5, atol=1e-5)
    f_loss.backward()
    r_loss.backward()
    for (name, p), q in zip(folded.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_layer_with_every_head_silent_equals_reference():
    """A narrow tent can silence all of a layer's heads: attention then runs over zero heads."""
    folded, reference = twin_models(narrowness=0.05)
    alpha = 0.5
    assert 0 in folded_at(folded, alpha).active_units()["heads"]
    idx = batch()
    torch.testing.assert_close(folded(idx, alpha, idx)[0], reference(idx, alpha, idx)[0], rtol=1e-5, atol=1e-5)
    cache = KVCache(idx.size(0), CONFIG["block_size"])
    dialed = folded.at(alpha)
    cached = torch.cat([dialed(idx[:, t : t + 1], cache=cache)[0] for t in range(idx.size(1))], dim=1)
    torch.testing.assert_close(cached, reference(idx, alpha, idx)[0], rtol=1e-5, atol=1e-5)


def test_no_attention_kernel_runs_over_zero_heads(monkeypatch):
    """torch 2.11's CPU attention dies (SIGFPE) over zero heads: a layer whose heads are all cut calls none."""
    import abcgpt.model.attention

    def attention(q, *args, **kwargs):
        assert q.size(1) > 0, "scaled_dot_product_attention over zero heads"
        return sdpa(q, *args, **kwargs)

    sdpa = abcgpt.model.attention.F.scaled_dot_product_attention
    monkeypatch.setattr(abcgpt.model.attention.F, "scaled_dot_product_attention", attention)
    folded, reference = twin_models(narrowness=0.05)
    assert 0 in folded_at(folded, 0.5).active_units()["heads"]
    idx = batch()
    torch.testing.assert_close(folded(idx, 0.5, idx)[0], reference(idx, 0.5, idx)[0], rtol=1e-5, atol=1e-5)
    cache = KVCache(idx.size(0), CONFIG["block_size"])
    dialed = folded.at(0.5)
    cached = torch.cat([dialed(idx[:, t : t + 1], cache=cache)[0] for t in range(idx.size(1))], dim=1)
    torch.testing.assert_close(cached, reference(idx, 0.5, idx)[0], rtol=1e-5, atol=1e-5)


def test_folded_refuses_per_sequence_alpha():
    folded, _ = twin_models()
    with pytest.raises(ValueError, match="one alpha per batch"):
        folded(batch(), torch.tensor([0.1, 0.5, 0.9]))


@pytest.mark.parametrize("alpha, narrowness", [(0.0, 1.0), (1.0, 1.0), (0.3, 0.5), (0.9, 0.4)])
def test_skipping_equals_not_skipping(alpha, narrowness):
    model, _ = twin_models(narrowness=narrowness, bias=True)
    idx = batch()
    skipped, full = folded_at(model, alpha, skip=True), folded_at(model, alpha, skip=False)
    torch.testing.assert_close(model(idx, targets=idx, run=skipped)[0], model(idx, targets=idx, run=full)[0],
                               rtol=1e-5, atol=1e-6)
    # and skipping really leaves units out: at least a quarter of the hidden units here
    active = skipped.active_units()
    assert sum(active["hidden"]) < 0.75 * 4 * CONFIG["n_embd"] * CONFIG["n_layer"]
    assert active["channels"] < CONFIG["n_embd"]


def test_corners_keep_about_half_of_each_group():
    model, _ = twin_models(n_embd=64)
    for alpha in (0.0, 1.0):
        active = folded_at(model, alpha).active_units()
        for group_size, count in [(64, active["channels"])] + [(256, h) for h in active["hidden"]]:
            assert 0.3 * group_size < count < 0.7 * group_size


def test_a_layer_with_no_active_head_or_unit():
    """Very narrow gates can silence whole groups: folded still equals reference, cached or not."""
    folded, reference = twin_models(narrowness=0.05)
    alpha = torch.tensor(0.5)
    active = folded_at(folded, 0.5).active_units()
    assert 0 in active["heads"]  # the case under test does occur
    idx = batch()
    torch.testing.assert_close(folded(idx, alpha, idx)[0], reference(idx, alpha, idx)[0], rtol=1e-5, atol=1e-5)
    prompt = idx[:, :3]
    runs = [generate(m.double().eval(), prompt, Generation(0.5, seed=0, max_new_tokens=10))
            for m in (folded, reference)]
    assert torch.equal(runs[0], runs[1])


def test_skipping_follows_scores_loaded_later():
    """The host copies of the scores used to find silent units are refreshed when the buffers change."""
    folded, _ = twin_models()
    idx = batch()
    folded(idx, 1.0, idx)  # fills the host copies
    torch.manual_seed(9)
    other = GPT(GPTConfig(**CONFIG, mask_seed=99, sort_units=False), "reference")
    folded.load_state_dict(other.state_dict())
    assert torch.equal(folding_state(folded).host_scores(folded).embd, other.embd_scores)
    for alpha in (0.0, 1.0):
        torch.testing.assert_close(folded(idx, alpha, idx)[0], other(idx, alpha, idx)[0], rtol=1e-5, atol=1e-5)
