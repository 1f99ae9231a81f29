"""A dial over many sources (docs/design.md, section 8): where units sit, the gates of a point, uniform
mode, and that two sources on the line stay exactly what they were."""
from pathlib import Path

import pytest
import torch
from conftest import SMALL_GPT, token_batch

from abcgpt.backends.registry import executor_for
from abcgpt.gates.gate import GEOMETRIES, gates_for, place_units, point_gate, sort_key, tent_gate
from abcgpt.gates.voice import Dial, draw
from abcgpt.model.gpt import GPT, GPTConfig
from abcgpt.training.run import load_model

FIXTURES = Path(__file__).parent / "fixtures"
MANY = ("pool", "simplex", "tent")


def same_as_main(logits, made_by_main):
    """Bit for bit on the CPU that made the fixture; another CPU's matrix kernels round differently (an AMD
    EPYC here differed by 1.5e-7 at most, on logits of about 0.5), so within a few ulps: a wrong gate or
    score moves the logits by orders of magnitude more."""
    torch.testing.assert_close(logits, made_by_main, rtol=1e-6, atol=2e-7)


def test_a_two_source_checkpoint_of_main_gives_the_same_logits():
    """The checkpoint and its logits were made by main at 6e08da0, before the dial had a type or a geometry.
    Today's two ways of giving alpha agree bit for bit on any CPU."""
    expected = torch.load(FIXTURES / "two_source_main_6e08da0_logits.pt")
    idx = expected["idx"]
    for backend in ("reference", "folded"):
        model, _, _ = load_model(FIXTURES / "two_source_main_6e08da0.pt", backend=backend)
        for alpha in (0.0, 0.3, 1.0):
            logits = model(idx, alpha, idx)[0]
            same_as_main(logits, expected[f"{backend}@{alpha:g}"])
            assert torch.equal(model(idx, Dial.alpha(alpha), idx)[0], logits), (backend, alpha)
    model, _, _ = load_model(FIXTURES / "two_source_main_6e08da0.pt", backend="reference")
    same_as_main(model(idx, torch.tensor([0.0, 0.6, 1.0]), idx)[0], expected["reference@rows"])


def test_training_two_sources_today_makes_main_s_checkpoint(tmp_path, monkeypatch):
    """The same settings and texts that made the fixture on main train to the same weights: the line's draw,
    its scores and its gates are what they were. Main seeded its streams with seed * 2**40 + step * 2**20 +
    index, whose bits above 32 the CPU generator ignored; that one function is put back for the comparison.
    Bit for bit on the CPU that made the fixture; another CPU's matrix kernels round differently (an AMD EPYC
    here differed by an ulp or two, 6e-8 at most), so the weights are compared to within a few ulps: a wrong
    draw, score or gate moves them by orders of magnitude more."""
    from dataclasses import replace

    from abcgpt.training import trainer
    from abcgpt.training.run import Run
    from abcgpt.training.trainer import Trainer

    def main_s(seed, step, index, purpose):
        return ((seed + trainer.STREAMS.index(purpose)) * 2**40 + step * 2**20 + index) % 2**63

    monkeypatch.setattr(trainer, "stream_seed", main_s)

    made = Run.load(FIXTURES / "two_source_main_6e08da0.pt")
    texts = [f"{name}={FIXTURES / f'two_source_{name}.txt'}" for name in made.source_names]
    Trainer(replace(made.train_config, sources=texts, out_dir=str(tmp_path / "again")), log=lambda line: None).train()
    again = Run.load(tmp_path / "again" / "ckpt.pt")
    assert again.source_sha256 == made.source_sha256 and again.model.keys() == made.model.keys()
    for k in made.model:
        torch.testing.assert_close(again.model[k], made.model[k], rtol=1e-6, atol=1e-7, msg=k)


def test_the_simplex_with_two_sources_is_the_line():
    generator = torch.Generator().manual_seed(0)
    m = torch.rand(500, generator=generator)
    places = torch.stack([1 - m, m], -1)
    alphas = torch.rand(64, generator=generator)
    for w in (1.0, 0.6):
        line = tent_gate(alphas, m, w)
        simplex = point_gate(torch.stack([1 - alphas, alphas], -1), places, "simplex", w)
        assert torch.allclose(simplex, line, atol=1e-5)


def test_pool_units_are_shared_or_owned_evenly():
    places = place_units(1000, torch.Generator().manual_seed(1), "pool", n_sources=7, shared=0.6)
    shared = places.max(-1).values < 1
    assert shared.sum().item() == 600
    owners = places[~shared].argmax(-1)
    counts = torch.bincount(owners, minlength=7)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 400
    for k in range(7):
        at_k = point_gate(torch.nn.functional.one_hot(torch.tensor(k), 7).float(), places, "pool")
        assert (at_k[shared] == 1).all()
        assert (at_k[~shared][owners == k] == 1).all() and (at_k[~shared][owners != k] == 0).all()


@pytest.mark.parametrize("geometry", MANY)
def test_a_unit_fires_fully_at_its_own_place_and_never_outside_zero_to_one(geometry):
    places = place_units(300, torch.Generator().manual_seed(2), geometry, n_sources=5)
    assert places.shape == (300, 5) and torch.allclose(places.sum(-1), torch.ones(300))
    assert torch.allclose(point_gate(places, places, geometry).diagonal(), torch.ones(300))  # each at its place
    dials, _ = draw(200, 5, geometry, torch.Generator().manual_seed(3))
    gates = point_gate(dials.point, places, geometry)
    assert gates.shape == (200, 300) and (gates >= 0).all() and (gates <= 1).all()


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_uniform_mode_opens_every_gate_and_only_in_its_rows(geometry):
    model = GPT(GPTConfig(**SMALL_GPT, geometry=geometry, n_sources=4 if geometry != "line" else 0))
    dials, _ = draw(6, 4, geometry, torch.Generator().manual_seed(4), uniform_share=0.5)
    dials = Dial(dials.point, dials.mixture, torch.tensor([True, False, True, False, False, True]))
    gates = model.gates(dials)
    plain = model.gates(Dial(dials.point, dials.mixture))
    for got, without in zip(gates.groups(), plain.groups()):
        assert (got[dials.uniform] == 1).all()
        assert torch.equal(got[~dials.uniform], without[~dials.uniform])


@pytest.mark.parametrize("geometry", MANY)
def test_folded_matches_the_reference_on_a_many_source_dial(geometry):
    torch.manual_seed(0)
    config = GPTConfig(**SMALL_GPT, geometry=geometry, n_sources=5, narrowness=0.8)
    folded, reference = GPT(config, "folded"), GPT(config, "reference")
    reference.load_state_dict(folded.state_dict())
    idx = token_batch(seed=5, B=3, T=17)  # not a multiple of anything
    settings = [Dial.source(2, geometry, 5), Dial.mixture_of([0.1, 0.0, 0.5, 0.4, 0.0]),
                Dial.everywhere(geometry, 5)]
    for dial in settings:
        assert torch.allclose(folded(idx, dial, idx)[0], reference(idx, dial, idx)[0], atol=2e-5)
    rows = Dial.stack([Dial.source(0, geometry, 5), settings[1], settings[2]])  # one setting per sequence
    per_row = reference(idx, rows, idx)[0]
    for i, dial in enumerate([Dial.source(0, geometry, 5), settings[1], settings[2]]):
        assert torch.allclose(per_row[i], reference(idx[i:i + 1], dial, idx[i:i + 1])[0][0], atol=2e-5)


@pytest.mark.parametrize("geometry", MANY)
def test_sorting_units_groups_each_source_and_keeps_the_function(geometry):
    torch.manual_seed(1)
    config = GPTConfig(**SMALL_GPT, geometry=geometry, n_sources=3)
    unsorted = GPT(GPTConfig(**{**config.to_dict(), "sort_units": False}), "reference")
    torch.manual_seed(1)
    sorted_model = GPT(config, "reference")
    idx, dial = token_batch(seed=6), Dial.mixture_of([0.2, 0.5, 0.3])
    assert torch.allclose(unsorted(idx, dial, idx)[0], sorted_model(idx, dial, idx)[0], atol=2e-5)
    for places in sorted_model.scores().groups():
        key = sort_key(places)
        assert (key[1:] >= key[:-1]).all()


def test_a_line_alpha_on_a_many_source_model_is_one_clear_error():
    model = GPT(GPTConfig(**SMALL_GPT, geometry="pool", n_sources=3))
    with pytest.raises(Exception, match="mixture of its sources, not an alpha"):
        model(token_batch(), 0.5)
    with pytest.raises(ValueError, match="got 2 alphas for a batch of 3"):
        model(token_batch(), Dial.mixture_of(torch.ones(2, 3)))
    with pytest.raises(Exception, match="a mixture of 3 sources; got 5 weights"):
        model(token_batch(), Dial.mixture_of(torch.ones(5)))


def test_the_line_keeps_its_scores_and_gates():
    """The same mask_seed gives the line the scores it always had, and no uniform row leaves its gates as
    the tent gives them."""
    from abcgpt.gates.gate import UnitGroups, sample_scores

    assert torch.equal(place_units(300, torch.Generator().manual_seed(9)),
                       sample_scores(300, torch.Generator().manual_seed(9)))
    scores = place_units(100, torch.Generator().manual_seed(7))
    groups = UnitGroups(scores, [scores[:4]], [scores[:50]])
    for alpha in (torch.tensor(0.3), torch.rand(5)):
        assert torch.equal(gates_for(alpha, groups).embd, tent_gate(alpha, scores))


def test_folded_keeps_exactly_the_dialled_units_on_the_pool():
    """At a source's setting the folded backend gathers the shared units and that source's: not one block."""
    model = GPT(GPTConfig(**SMALL_GPT, geometry="pool", n_sources=4, shared=0.5), "folded")
    kept = executor_for(model, Dial.source(2, "pool", 4), 3, torch.device("cpu")).active_units()
    count = lambda places: int((places.max(-1).values < 1).sum() + (places[:, 2] == 1).sum())
    assert kept["channels"] == count(model.embd_scores) < SMALL_GPT["n_embd"]
    assert kept["hidden"] == [count(block.mlp.hidden_scores) for block in model.transformer.h]
    everything = executor_for(model, Dial.everywhere("pool", 4), 3, torch.device("cpu")).active_units()
    assert everything["channels"] == SMALL_GPT["n_embd"]
