import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from abcgpt.gates.gate import tent_gate
from abcgpt.model.gpt import GPT, GPTConfig

SMALL = dict(block_size=32, vocab_size=50, n_layer=2, n_head=3, n_embd=24, dropout=0.0)


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_vanilla_parameter_count_is_nanogpts():
    # nanoGPT's shakespeare_char model: 6 layers, 6 heads, 384 wide, vocab 65, no biases.
    # Per layer: c_attn 384*1152 + attn c_proj 384*384 + c_fc 384*1536 + mlp c_proj 1536*384
    # + two LayerNorm weights; then the tied token embedding 65*384 and ln_f.
    per_layer = 384 * 1152 + 384 * 384 + 2 * 384 * 1536 + 2 * 384
    expected = 6 * per_layer + 65 * 384 + 384
    model = GPT(GPTConfig(vocab_size=65, gated=False))
    assert model.get_num_params() == expected == 10_646_784  # "10.65M"


def test_gated_and_vanilla_share_modules_and_init():
    torch.manual_seed(0)
    vanilla = GPT(GPTConfig(**SMALL, gated=False))
    torch.manual_seed(0)
    gated = GPT(GPTConfig(**SMALL, sort_units=False))  # sorting relabels the same init
    v, g = dict(vanilla.named_parameters()), dict(gated.named_parameters())
    assert v.keys() == g.keys()
    assert all(torch.equal(v[k], g[k]) for k in v)
    assert list(vanilla.buffers()) == []  # no scores at all without gates
    assert {n for n, _ in gated.named_buffers()} == (
        {"embd_scores"}
        | {f"transformer.h.{i}.attn.head_scores" for i in range(2)}
        | {f"transformer.h.{i}.mlp.hidden_scores" for i in range(2)}
    )


def test_vanilla_forward_has_no_gate_operation(monkeypatch):
    torch.manual_seed(0)
    idx = torch.randint(0, 50, (2, 10))
    vanilla, gated = GPT(GPTConfig(**SMALL, gated=False)), GPT(GPTConfig(**SMALL))
    with RecordOps() as vanilla_ops:
        vanilla(idx, targets=idx)
    with RecordOps() as gated_ops:
        gated(idx, 0.3, targets=idx)
    gate_ops = {"mul", "sin", "cos", "pow", "abs", "maximum", "clamp"}
    assert not gate_ops & set(vanilla_ops.ops), vanilla_ops.ops
    assert gate_ops & set(gated_ops.ops)  # the probe sees gates where there are some


@pytest.mark.parametrize("backend", ["reference", "folded"])
def test_gates_multiply_where_the_design_says(backend):
    """Gated forward against an independent, step-by-step rewrite of section 1."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(**SMALL, bias=True), backend).eval()
    idx = torch.randint(0, 50, (3, 11))
    alpha = 0.37
    g = lambda m: tent_gate(alpha, m)
    tr = model.transformer
    x = (tr.wte(idx) + tr.wpe(torch.arange(11))) * g(model.embd_scores)
    for block in tr.h:
        a = block.attn
        q, k, v = a.c_attn(block.ln_1(x)).split(24, dim=2)
        heads = lambda t: t.view(3, 11, 3, 8).transpose(1, 2)
        att = (heads(q) @ heads(k).transpose(-2, -1)) / 8**0.5
        att = att.masked_fill(torch.triu(torch.ones(11, 11, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        y = (att @ heads(v)) * g(a.head_scores)[:, None, None]
        x = x + a.c_proj(y.transpose(1, 2).reshape(3, 11, 24)) * g(model.embd_scores)
        h = torch.nn.functional.gelu(block.mlp.c_fc(block.ln_2(x))) * g(block.mlp.hidden_scores)
        x = x + block.mlp.c_proj(h) * g(model.embd_scores)
    expected = model.lm_head(tr.ln_f(x) * g(model.embd_scores))
    logits, _ = model(idx, alpha, targets=idx)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_per_sequence_alpha_equals_each_sequence_alone():
    torch.manual_seed(2)
    model = GPT(GPTConfig(**SMALL)).eval()
    idx = torch.randint(0, 50, (4, 17))
    alphas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    together, _ = model(idx, alphas, targets=idx)
    for i, a in enumerate(alphas.tolist()):
        alone, _ = model(idx[i : i + 1], a, targets=idx[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def test_the_dial_changes_the_output():
    torch.manual_seed(3)
    model = GPT(GPTConfig(**SMALL)).eval()
    idx = torch.randint(0, 50, (1, 8))
    assert not torch.allclose(model(idx, 0.0)[0], model(idx, 1.0)[0])


def test_scores_come_from_mask_seed_not_the_global_rng():
    torch.manual_seed(0)
    a = GPT(GPTConfig(**SMALL, mask_seed=5))
    torch.manual_seed(1)
    b = GPT(GPTConfig(**SMALL, mask_seed=5))
    c = GPT(GPTConfig(**SMALL, mask_seed=6))
    assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers()))
    assert not torch.equal(a.embd_scores, c.embd_scores)


def test_scores_are_not_trained():
    torch.manual_seed(4)
    model = GPT(GPTConfig(**SMALL))
    before = [b.clone() for b in model.buffers()]
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cpu")
    idx = torch.randint(0, 50, (2, 8))
    for _ in range(3):
        model(idx, 0.4, idx)[1].backward()
        opt.step()
    assert all(torch.equal(b, a) for b, a in zip(before, model.buffers()))
    assert all(not b.requires_grad for b in model.buffers())


def test_optimizer_decays_matrices_only():
    model = GPT(GPTConfig(**SMALL, bias=True))
    decay, no_decay = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(map(len, (decay["params"], no_decay["params"]))) == len(list(model.parameters()))


@pytest.mark.parametrize("alpha, message", [
    (None, "a gated model needs alpha"),
    (1.2, r"alpha must be in \[0, 1\], got 1.2"),
    (-0.5, r"alpha must be in \[0, 1\], got -0.5"),
    (float("nan"), r"alpha must be in \[0, 1\], got nan"),
    (torch.tensor([0.1, 0.2, 0.3]), "got 3 alphas for a batch of 2 sequences"),
])
def test_bad_alpha_is_refused_by_the_model(alpha, message):
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(2, 4, dtype=torch.long), alpha)


def test_vanilla_model_refuses_a_dial():
    model = GPT(GPTConfig(**SMALL, gated=False))
    with pytest.raises(ValueError, match="not gated"):
        model(torch.zeros(1, 4, dtype=torch.long), 0.5)


def test_too_long_sequence_is_refused():
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long), 0.5)
