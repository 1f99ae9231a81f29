"""The folded backend, unit sorting, skipping of silent units, and the key/value cache."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abcgpt.attention import KVCache
from abcgpt.checkpoint import load_checkpoint
from abcgpt.run import load_model
from abcgpt.folded import Folded, active_ranges
from abcgpt.gate import gates_for
from abcgpt.model import GPT, GPTConfig
from abcgpt.sampling import generate
from abcgpt.units import sort_units

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(block_size=24, vocab_size=30, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
ALPHAS = [0.0, 1.0, 0.5, 0.137, 0.81]


def twin_models(**overrides):
    """A folded-backend model and a reference-backend copy with the same weights."""
    torch.manual_seed(0)
    folded = GPT(GPTConfig(**{**CONFIG, **overrides}), "folded")
    reference = GPT(GPTConfig(**{**CONFIG, **overrides}), "reference")
    reference.load_state_dict(folded.state_dict())
    return folded, reference


def folded_at(model, alpha, skip=True):
    """The folded executor at one alpha, cutting silent units (skip) or keeping every unit."""
    gates = gates_for(torch.tensor(alpha), model.scores(), model.config.narrowness)
    return Folded(model, gates, active_ranges(model, alpha if skip else None, gates))


def batch(seed=1, B=3, T=20):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG["vocab_size"], (B, T), generator=g)


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
    cache = KVCache(CONFIG["block_size"])
    dialed = folded.at(alpha)
    cached = torch.cat([dialed(idx[:, t : t + 1], cache=cache)[0] for t in range(idx.size(1))], dim=1)
    torch.testing.assert_close(cached, reference(idx, alpha, idx)[0], rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("alpha", [0.0, 0.42, 1.0, "rows"])
def test_sorting_units_leaves_the_function_unchanged(alpha):
    torch.manual_seed(3)
    unsorted = GPT(GPTConfig(**CONFIG, bias=True, sort_units=False), "reference")
    ordered = copy.deepcopy(unsorted)
    sort_units(ordered)
    assert not torch.equal(unsorted.embd_scores, ordered.embd_scores)
    assert torch.all(ordered.embd_scores.diff() >= 0)
    assert all(torch.all(b.mlp.hidden_scores.diff() >= 0) for b in ordered.transformer.h)
    assert all(torch.all(b.attn.head_scores.diff() >= 0) for b in ordered.transformer.h)
    idx = batch()
    a = torch.tensor([0.0, 0.6, 1.0]) if alpha == "rows" else alpha
    torch.testing.assert_close(ordered(idx, a, idx)[0], unsorted(idx, a, idx)[0], rtol=1e-5, atol=1e-6)


def test_sorting_carries_the_optimizer_state_along():
    """Step, sort, step equals step, step, sort: training resumes on the sorted model as if unsorted.

    No biases here: the key bias's true gradient is 0 and Adam would amplify its rounding noise.
    """
    torch.manual_seed(4)
    model = GPT(GPTConfig(**CONFIG, sort_units=False), "reference")
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cpu")

    def step(m, opt, alpha, seed):
        idx = batch(seed)
        m(idx, alpha, idx)[1].backward()
        opt.step()
        opt.zero_grad()

    step(model, optimizer, 0.3, 1)
    other = copy.deepcopy(model)
    other_optimizer = other.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cpu")
    other_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # loading alone would share tensors

    step(model, optimizer, 0.7, 2)  # step, then sort
    sort_units(model)
    state = sort_units(other, other_optimizer.state_dict())  # sort, then step
    other_optimizer.load_state_dict(state)
    step(other, other_optimizer, 0.7, 2)
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_permute_command_sorts_a_checkpoint(trained_checkpoint, tmp_path):
    dest = tmp_path / "sorted.pt"
    result = subprocess.run([sys.executable, "-m", "abcgpt.permute", str(trained_checkpoint), str(dest)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before, _, _ = load_model(trained_checkpoint)
    after, _, run = load_model(dest)
    assert torch.all(after.embd_scores.diff() >= 0) and run.model_config.sort_units
    idx = torch.randint(0, before.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for alpha in (0.0, 0.5, 1.0):
        torch.testing.assert_close(after(idx, alpha, idx)[0], before(idx, alpha, idx)[0], rtol=1e-5, atol=1e-6)
    assert load_checkpoint(dest)["optimizer"]["state"]


def generation_model(backend="auto", **overrides):
    torch.manual_seed(5)
    return GPT(GPTConfig(**{**CONFIG, "vocab_size": 12, **overrides}), backend).double().eval()  # float64: no ties to break


@pytest.mark.parametrize("case", ["vanilla", "folded", "reference", "per-sequence"])
@pytest.mark.parametrize("prompt_len, new_tokens", [(1, 15), (5, 30)])  # 5 + 30 outgrows block_size 24
def test_cached_generation_gives_the_same_tokens(case, prompt_len, new_tokens):
    model = generation_model("reference" if case == "reference" else "auto", gated=case != "vanilla")
    alpha = {"vanilla": None, "folded": 1.0, "reference": 0.3, "per-sequence": torch.tensor([0.0, 0.5])}[case]
    prompt = torch.randint(0, 12, (2, prompt_len), generator=torch.Generator().manual_seed(6))
    runs = [
        generate(model, prompt, new_tokens, alpha, temperature=1.5, generator=torch.Generator().manual_seed(7),
                 use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape == (2, prompt_len + new_tokens)


def test_cache_logits_match_a_full_forward():
    model = generation_model()
    idx = batch(T=20).remainder(12)
    full, _ = model(idx, 0.25, idx)
    cache = KVCache(model.config.block_size)
    decode = model.at(0.25)
    pieces = [decode(idx[:, :7], idx[:, :7], cache)[0]]  # a prompt, then one token at a time
    for t in range(7, 20):
        pieces.append(decode(idx[:, t : t + 1], idx[:, t : t + 1], cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)


def test_cache_refuses_to_overflow():
    model = generation_model(gated=False)
    cache = KVCache(model.config.block_size)
    model(torch.zeros(1, 20, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_auto_backend_picks_by_alpha_and_device():
    model = GPT(GPTConfig(**CONFIG))
    assert model.gate_backend(torch.device("cpu")) == "folded"
    assert model.gate_backend(torch.device("cuda")) == "folded"
    assert model.gate_backend(torch.device("cpu"), per_row=True) == "reference"
    assert model.gate_backend(torch.device("cuda"), per_row=True) == "triton"


def test_a_layer_with_no_active_head_or_unit():
    """Very narrow gates can silence whole groups: folded still equals reference, cached or not."""
    folded, reference = twin_models(narrowness=0.05)
    alpha = torch.tensor(0.5)
    active = folded_at(folded, 0.5).active_units()
    assert 0 in active["heads"]  # the case under test does occur
    idx = batch()
    torch.testing.assert_close(folded(idx, alpha, idx)[0], reference(idx, alpha, idx)[0], rtol=1e-5, atol=1e-5)
    prompt = idx[:, :3]
    runs = [generate(m.double().eval(), prompt, 10, 0.5, generator=torch.Generator().manual_seed(0))
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
    assert torch.equal(folded.folding.host_scores(folded).embd, other.embd_scores)
    for alpha in (0.0, 1.0):
        torch.testing.assert_close(folded(idx, alpha, idx)[0], other(idx, alpha, idx)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["vanilla", "folded", "per-sequence"])
def test_compiled_decoder_steps_without_recompiling_and_gives_the_same_tokens(case):
    """The one-token steps over a static-shape cache trace once (a recompile would raise here) and give what
    the eager cache gives, into window mode past block_size too."""
    from abcgpt.recompiles import forbid_recompiles
    from abcgpt.sampling import CompiledDecoder

    model = generation_model(gated=case != "vanilla")
    alpha = {"vanilla": None, "folded": 0.0, "per-sequence": torch.tensor([0.2, 0.9])}[case]
    prompt = torch.randint(0, 12, (2, 4), generator=torch.Generator().manual_seed(8))
    torch._dynamo.reset()
    decoder = CompiledDecoder(model, alpha, backend="eager")  # dynamo's tracing and guards, without a compiler
    generate(model, prompt, 3, alpha, decoder=decoder)  # the first step traces
    with forbid_recompiles():
        for new_tokens in (10, 30):  # 4 + 30 outgrows block_size 24
            runs = [generate(model, prompt, new_tokens, alpha, temperature=1.5, decoder=d,
                             generator=torch.Generator().manual_seed(3)) for d in (decoder, None)]
            assert torch.equal(runs[0], runs[1])
