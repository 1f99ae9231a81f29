import os
import random

import torch

if not torch.cuda.is_available():  # kernels run in Triton's CPU interpreter; set before triton.jit runs
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from abcgpt.model.gpt import GPT, GPTConfig  # noqa: E402
from abcgpt.training.config import TrainConfig  # noqa: E402
from abcgpt.training.trainer import Trainer  # noqa: E402

torch.set_num_threads(2)


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test that reaches a kernel where Triton's interpreter cannot run is skipped, with the reason."""
    from abcgpt_kernels.ops import InterpreterUnavailable

    try:
        return (yield)
    except InterpreterUnavailable as problem:
        pytest.skip(f"Triton's interpreter cannot run here: {problem}")


SMALL_GPT = dict(block_size=24, vocab_size=30, n_layer=2, n_head=4, n_embd=32, dropout=0.0)  # a model to test on


def token_batch(seed=1, B=3, T=20, vocab_size=SMALL_GPT["vocab_size"]):
    """Random token ids (B, T), the same for the same seed."""
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def twin_models(backend, device="cpu", seed=0, **config):
    """A model on the given gate backend and a reference-backend copy with the same weights: what every
    fast path is held to."""
    torch.manual_seed(seed)
    fast = GPT(GPTConfig(**config), backend).to(device)
    reference = GPT(GPTConfig(**config), "reference").to(device)
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def story_text(n_sentences, seed=0):
    """Plain lowercase prose, in the manner of TinyStories."""
    rng = random.Random(seed)
    names = ["lily", "tom", "ben", "mia", "sam"]
    things = ["ball", "cat", "tree", "cake", "dog", "box"]
    verbs = ["saw", "liked", "found", "wanted", "made"]
    return " ".join(
        f"one day {rng.choice(names)} {rng.choice(verbs)} a big {rng.choice(things)}. it was happy."
        for _ in range(n_sentences)
    )


def play_text(n_lines, seed=1):
    """Upper-case speakers and verse, in the manner of tinyshakespeare."""
    rng = random.Random(seed)
    speakers = ["ROMEO", "JULIET", "KING HENRY", "GLOUCESTER"]
    words = ["thou", "art", "my", "lord", "Wherefore", "O", "hence", "doth", "thy", "grace"]
    return "\n\n".join(
        f"{rng.choice(speakers)}:\n" + " ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + ";"
        for _ in range(n_lines)
    )


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    stories, plays = root / "stories.txt", root / "plays.txt"
    stories.write_text(story_text(400))
    plays.write_text(play_text(400))
    return stories, plays


def tiny_config(corpus_files, out_dir, **overrides):
    stories, plays = corpus_files
    values = dict(
        sources=[f"stories={stories}", f"plays={plays}"], n_layer=2, n_head=2, n_embd=32, block_size=16,
        batch_size=4, dropout=0.1, max_iters=6, warmup_iters=2, learning_rate=3e-3, min_lr=3e-4,
        eval_interval=3, eval_iters=2, log_interval=3, out_dir=str(out_dir), device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def trained_checkpoint(corpus_files, tmp_path_factory):
    """A checkpoint of a tiny gated model trained for a few steps."""
    out_dir = tmp_path_factory.mktemp("run")
    trainer = Trainer(tiny_config(corpus_files, out_dir), log=lambda line: None)
    trainer.train()
    return out_dir / "ckpt.pt"


def word_text(n_lines, seed=2):
    """Short lines of a few repeated words: a third voice, unlike stories and plays."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    return "\n".join(" ".join(rng.choice(words) for _ in range(6)) for _ in range(n_lines))


@pytest.fixture(scope="session")
def voices_checkpoint(corpus_files, tmp_path_factory):
    """A checkpoint of a tiny gated model over three sources on the pool dial, trained for a few steps."""
    stories, plays = corpus_files
    words = stories.parent / "words.txt"
    words.write_text(word_text(400))
    out_dir = tmp_path_factory.mktemp("voices-run")
    config = tiny_config(corpus_files, out_dir, geometry="pool", uniform_share=0.2,
                         sources=[f"stories={stories}", f"plays={plays}", f"words={words}"])
    Trainer(config, log=lambda line: None).train()
    return out_dir / "ckpt.pt"
