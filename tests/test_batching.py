"""Batched decoding: many requests at their own alphas and seeds, each getting what it would get alone,
whoever else is served, whatever another request asks for; and its limits (queue, deadline, slots)."""
import asyncio

import pytest

from abcgpt.batching import BatchedDecoder, DecodingFailed, QueueFull, Request, TimedOut
from abcgpt.run import load_model


# the model in float64, so that no float rounding can part batched from alone
@pytest.fixture(scope="module")
def model64(trained_checkpoint):
    return load_model(trained_checkpoint)[0].double()


def decode(model, requests, max_batch=8, join_later=()):
    """Run a decoder over requests (and join_later, submitted once the first ones are under way)."""
    decoder = BatchedDecoder(model, max_batch)

    async def main():
        task = asyncio.create_task(decoder.run())
        for r in requests:
            decoder.submit(r)
        if join_later:
            while not any(len(r.tokens) >= 3 for r in requests):
                await asyncio.sleep(0.001)
            for r in join_later:
                decoder.submit(r)
        everyone = [*requests, *join_later]
        while not all(r.done for r in everyone):
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(main())
    return decoder


def request(alpha, seed=0, top_k=1, n=20, prompt=(4, 5, 6)):
    return Request(list(prompt), alpha, n, temperature=1.0, top_k=top_k, seed=seed)


def test_greedy_requests_at_different_alphas_get_what_they_would_alone(model64):
    alphas = [0.0, 0.15, 0.5, 0.5, 0.9, 1.0]
    prompts = [(4, 5, 6), (7,), (4, 5, 6), (8, 9, 10, 11), (4,), (12, 13)]
    together = [request(a, prompt=p) for a, p in zip(alphas, prompts)]
    decoder = decode(model64, together)
    assert decoder.largest_batch == len(alphas)  # one forward per step served them all
    for r, a, p in zip(together, alphas, prompts):
        alone = request(a, prompt=p)
        decode(model64, [alone])
        assert r.tokens == alone.tokens
    assert len({tuple(r.tokens) for r in together}) > 1  # the dial made a difference


def test_sampled_requests_depend_on_their_seed_alone_whoever_joins(model64):
    """Requests join and leave between steps; each draws from its own generator."""
    def mine():
        return request(0.4, seed=99, top_k=None, n=30)

    alone = mine()
    decode(model64, [alone])
    crowded = mine()
    others = [request(a, seed=s, top_k=None, n=n) for a, s, n in [(0.0, 1, 5), (1.0, 2, 40), (0.7, 3, 12)]]
    late = [request(0.2, seed=4, top_k=None, n=25), request(0.9, seed=5, top_k=None, n=8)]
    decode(model64, [crowded, *others], max_batch=4, join_later=late)  # more requests than slots, too
    assert crowded.tokens == alone.tokens
    different = request(0.4, seed=100, top_k=None, n=30)
    decode(model64, [different])
    assert different.tokens != alone.tokens


def test_a_cancelled_request_frees_its_slot(model64):
    """Cancelled while its keys and values are cached, a request frees its slot; past block_size it holds
    none (each step recomputes its window), and cancelled there it ends too."""
    decoder = BatchedDecoder(model64, max_batch=2)
    first, long = request(0.5, n=1000, prompt=(4,)), request(0.2, n=1000, prompt=(4,))
    long.max_new_tokens = 10**6  # far beyond the context: decoded window by window until cancelled

    async def main():
        task = asyncio.create_task(decoder.run())
        decoder.submit(first)
        decoder.submit(long)
        while len(first.tokens) < 3:
            await asyncio.sleep(0.001)
        assert decoder.cache.used == 2
        first.cancelled = True
        while decoder.cache.used > 1:
            await asyncio.sleep(0.001)
        while len(long.tokens) < 20:  # past block_size 16: the window path, with no slot
            await asyncio.sleep(0.001)
        assert decoder.cache.used == 0
        long.cancelled = True
        while decoder.active:
            await asyncio.sleep(0.001)
        assert await long.queue.get() is not None  # its tokens, then the end
        task.cancel()

    asyncio.run(main())
    assert decoder.active == []




def test_a_hostile_temperature_leaves_every_other_request_as_it_would_be_alone(model64):
    """A temperature of 1e-40 once overflowed logits / temperature to inf and failed the whole batch; now it
    samples greedily, and the requests beside it get their full, unchanged text."""
    def honest():
        return [request(a, seed=s, top_k=None, n=30) for a, s in [(0.0, 1), (0.4, 2), (0.7, 3), (1.0, 4)]]

    hostile = Request([4, 5, 6], 0.5, 30, temperature=1e-40, seed=9)
    together = honest()
    decode(model64, [*together[:2], hostile, *together[2:]])
    for mine in together:
        alone = next(r for r in honest() if r.alpha == mine.alpha)
        decode(model64, [alone])
        assert len(mine.tokens) == 30 and mine.tokens == alone.tokens and mine.error is None
    greedy = request(0.5, top_k=1, n=30)
    decode(model64, [greedy])
    assert hostile.tokens == greedy.tokens and hostile.error is None


def test_a_step_that_fails_ends_only_the_request_it_fails_for(model64):
    """A request the step cannot serve (an alpha of NaN, as validation would never let through) ends with its
    error; the step is taken again without it, and the others get their tokens as alone."""
    honest = [request(a, seed=s, top_k=None, n=25) for a, s in [(0.1, 5), (0.9, 6)]]
    failing = request(float("nan"), seed=7, top_k=None, n=25)
    decode(model64, [honest[0], failing, honest[1]])
    assert isinstance(failing.error, DecodingFailed) and "alpha must be in [0, 1]" in str(failing.error)
    for mine in honest:
        alone = request(mine.alpha, seed=mine.seed, top_k=None, n=25)
        decode(model64, [alone])
        assert mine.tokens == alone.tokens and mine.error is None


def test_the_queue_is_bounded(model64):
    decoder = BatchedDecoder(model64, max_batch=2, max_queue=3)
    for _ in range(3):
        decoder.submit(request(0.5))
    with pytest.raises(QueueFull, match="3 requests are waiting"):
        decoder.submit(request(0.5))


def test_a_request_past_its_deadline_ends_with_what_it_has(model64):
    slow = request(0.5, n=10**6, prompt=(4,))
    slow.timeout = 0.3
    decoder = decode(model64, [slow])
    assert isinstance(slow.error, TimedOut) and 0 < len(slow.tokens) < 10**6
    assert decoder.active == [] and decoder.cache.used == 0


def test_short_requests_are_not_starved_by_long_ones(model64):
    """With max_batch long requests holding slots, a short one still gets a slot at once (the slots beyond
    max_batch are kept for short requests), and a further long one waits."""
    decoder = BatchedDecoder(model64, max_batch=4, short_tokens=8)
    longs = [request(0.5, seed=i, top_k=None, n=10**6, prompt=(4,)) for i in range(5)]
    short = request(0.2, n=8)

    async def main():
        task = asyncio.create_task(decoder.run())
        for r in longs:
            decoder.submit(r)
        while not all(r.tokens for r in longs[:4]):
            await asyncio.sleep(0.001)
        decoder.submit(short)
        while not short.done:
            await asyncio.sleep(0.001)
        assert longs[4].slot is None and longs[4] in decoder.pending and not longs[4].tokens
        for r in longs:
            r.cancelled = True
        task.cancel()

    asyncio.run(main())
    assert short.tokens and short.error is None
