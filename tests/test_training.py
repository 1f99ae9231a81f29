import math

import pytest
import torch
from conftest import tiny_config

from abcgpt.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from abcgpt.training.config import TrainConfig, build_config
from abcgpt.training.run import load_model
from abcgpt.training.trainer import Trainer, learning_rate_at

quiet = dict(log=lambda line: None)


def test_learning_rate_schedule():
    c = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    lrs = [learning_rate_at(s, c) for s in range(130)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warm-up rises
    assert max(lrs) == pytest.approx(1e-3, rel=1e-3)
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 0.9e-3)  # cosine halfway
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))
    assert lrs[110:] == [1e-4] * 20


def test_training_learns_the_dial(corpus_files, tmp_path):
    config = tiny_config(corpus_files, tmp_path, max_iters=150, eval_interval=150, dropout=0.0, batch_size=8,
                         learning_rate=1e-2, min_lr=1e-3)
    trainer = Trainer(config, **quiet)
    before = trainer.evaluate()
    after = trainer.train()
    assert set(after) == {f"val/{s}@{a}" for s in ("stories", "plays") for a in ("0", "0.5", "1")}
    assert after["val/stories@0"] < before["val/stories@0"] - 1.0
    assert after["val/plays@1"] < before["val/plays@1"] - 1.0
    # each source is best predicted at its own end of the dial
    assert after["val/stories@0"] < after["val/stories@1"] - 0.3
    assert after["val/plays@1"] < after["val/plays@0"] - 0.3


def test_checkpoint_gives_identical_logits(trained_checkpoint, corpus_files):
    model, tokenizer, run = load_model(trained_checkpoint)
    trainer = Trainer(tiny_config(corpus_files, trained_checkpoint.parent), resume=True, **quiet)
    trainer.model.eval()
    assert run.step == trainer.step == 6
    idx = torch.tensor([tokenizer.encode("one day ROMEO:")])
    for alpha in (0.0, 0.3, 1.0, torch.tensor([0.7])):
        torch.testing.assert_close(model(idx, alpha, idx)[0], trainer.model(idx, alpha, idx)[0], rtol=0, atol=0)
    for saved, restored in zip(model.buffers(), trainer.model.buffers()):  # the scores travel too
        assert torch.equal(saved, restored)


@pytest.mark.parametrize("alpha_mode", ["batch", "sequence"])
def test_resume_continues_as_if_never_stopped(corpus_files, tmp_path, alpha_mode):
    settings = dict(max_iters=8, lr_decay_iters=8, eval_interval=100, grad_accum=2, dropout=0.2, alpha_mode=alpha_mode)
    straight = Trainer(tiny_config(corpus_files, tmp_path / "a", **settings), **quiet)
    straight.train()

    first = Trainer(tiny_config(corpus_files, tmp_path / "b", **{**settings, "max_iters": 3}), **quiet)
    first.train()  # checkpoints at its last step
    del first
    resumed = Trainer(tiny_config(corpus_files, tmp_path / "b", **settings), resume=True, **quiet)
    assert resumed.step == 3
    resumed.train()

    assert straight.tokens_seen() == resumed.tokens_seen()  # the same sources drawn, in all
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    s, r = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert s.keys() == r.keys()
    for k in s:
        assert torch.equal(s[k]["exp_avg"], r[k]["exp_avg"]) and torch.equal(s[k]["exp_avg_sq"], r[k]["exp_avg_sq"])


def test_checkpoint_holds_what_a_resume_needs(trained_checkpoint):
    state = load_checkpoint(trained_checkpoint)
    assert {"model", "optimizer", "model_config", "train_config", "tokenizer", "step", "seed", "source_names"} <= set(state)
    assert state["source_names"] == ["stories", "plays"]
    assert "embd_scores" in state["model"] and state["optimizer"]["state"]


def test_resume_refuses_another_architecture(trained_checkpoint, corpus_files):
    config = tiny_config(corpus_files, trained_checkpoint.parent, n_embd=64)
    with pytest.raises(CheckpointError, match="n_embd"):
        Trainer(config, resume=True, **quiet)


def test_bad_checkpoints_get_clear_errors(tmp_path, trained_checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(trained_checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not an abcGPT checkpoint"):
        load_checkpoint(foreign)


def test_checkpoint_refuses_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code while loading",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "abcgpt-checkpoint-v1", "x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)
    with pytest.raises(Exception):
        save_checkpoint({"step": 2, "bad": lambda: None}, path)  # cannot be pickled
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_resume_applies_only_the_flags_given(trained_checkpoint):
    saved = load_checkpoint(trained_checkpoint)["train_config"]
    config = build_config("cpu", {"max_iters": 99}, base=saved)
    assert config.max_iters == 99 and config.n_embd == saved["n_embd"] == 32


def test_vanilla_training_runs_without_a_dial(corpus_files, tmp_path):
    trainer = Trainer(tiny_config(corpus_files, tmp_path, gated=False, max_iters=3), **quiet)
    losses = trainer.train()
    assert set(losses) == {"val/stories", "val/plays"} and all(math.isfinite(v) for v in losses.values())


def test_checkpoint_whose_config_does_not_match_its_weights(trained_checkpoint, tmp_path):
    state = load_checkpoint(trained_checkpoint)
    state["model_config"]["n_embd"] = 48  # the weights are 32 wide
    edited = tmp_path / "edited.pt"
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, edited)
    with pytest.raises(CheckpointError, match="does not hold a usable model"):
        load_model(edited)
    assert load_checkpoint(trained_checkpoint)["model_config"]["n_embd"] == 32  # the original is untouched


def draws_at(trainer, step):
    """What one training step at `step` draws: its batch, its dial, and the first numbers of its dropout stream."""
    seen = {}
    model = trainer.forward_model

    def recording(x, alpha, y):
        seen.update(x=x.clone(), alpha=alpha.point.clone(), dropout=torch.rand(8))
        return model(x, alpha, y)

    trainer.forward_model, trainer.step = recording, step
    trainer.train_step()
    trainer.forward_model = model
    return seen


def test_every_seed_and_step_draws_its_own_streams(corpus_files, tmp_path):
    """The run's seed and the step each change the batches, the dials and dropout: the CPU generator uses
    32 bits of its seed, and bits above them (where the seed once sat, and steps 4096 apart) changed nothing."""
    trainers = {seed: Trainer(tiny_config(corpus_files, tmp_path / str(seed), seed=seed, alpha_mode="sequence"),
                              **quiet) for seed in (1337, 7)}
    draws = {(seed, step): draws_at(trainer, step) for seed, trainer in trainers.items() for step in (5, 5 + 4096)}
    again = draws_at(trainers[1337], 5)
    for what in ("x", "alpha", "dropout"):
        assert torch.equal(again[what], draws[1337, 5][what]), what  # the same (seed, step): the same stream
        assert not torch.equal(draws[1337, 5][what], draws[7, 5][what]), what
        assert not torch.equal(draws[1337, 5][what], draws[1337, 5 + 4096][what]), what
