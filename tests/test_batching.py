"""Batched decoding: many requests at their own alphas and seeds, each getting what it would get alone,
whoever else is served, whatever another request asks for; and its limits (queue, deadline, slots)."""
import asyncio
from dataclasses import replace

import pytest

from abcgpt.model.sampling import Generation, Sampling
from abcgpt.serving.batching import BatchedDecoder, ClientQueueFull, DecodingFailed, QueueFull, Request, TimedOut
from abcgpt.training.run import load_model


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
    return Request(list(prompt), Generation(alpha, Sampling(1.0, top_k), seed, n))


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
    # far beyond the context: decoded window by window until cancelled
    long.generation = replace(long.generation, max_new_tokens=10**6)

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

    hostile = Request([4, 5, 6], Generation(0.5, Sampling(1e-40, None), 9, 30))
    together = honest()
    decode(model64, [*together[:2], hostile, *together[2:]])
    for mine in together:
        alone = next(r for r in honest() if r.generation.dial == mine.generation.dial)
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
        alone = request(mine.generation.dial, seed=mine.generation.seed, top_k=None, n=25)
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


def short(client, seed=0):
    return Request([4, 5], Generation(0.5, Sampling(1.0, 1), seed, 4), client=client)


def test_a_free_seat_goes_to_the_client_served_least_recently(model64):
    """Six requests from one client, then one from another: the other's comes second, not seventh."""
    decoder = BatchedDecoder(model64, max_batch=2, max_per_client=10, max_queued_per_client=10)  # 3 seats
    flood = [short("a", seed=i) for i in range(6)]
    other = short("b")
    for r in [*flood, other]:
        decoder.submit(r)
    joining, ended = decoder._admit()
    assert joining == [flood[0], other, flood[1]] and not ended
    assert decoder.pending == flood[2:]


def test_a_long_request_waits_for_no_stream_of_shorter_ones(model64):
    """Short requests that arrive later, from clients of their own, never go before a long one waiting."""
    decoder = BatchedDecoder(model64, max_batch=2, short_tokens=8)  # 3 seats: 2 for any, 1 for short ones
    waiting_long = Request([4], Generation(0.5, Sampling(1.0, 1), 0, 100), client="honest")
    busy = [short(f"busy-{i}") for i in range(3)]
    for r in busy:
        decoder.submit(r)
    decoder.active, _ = decoder._admit()
    decoder.submit(waiting_long)
    for round in range(5):  # each round a seat comes free and three new short requests compete for it
        newcomers = [short(f"new-{round}-{i}") for i in range(3)]
        for r in newcomers:
            decoder.submit(r)
        decoder.active[0].cancelled = True
        decoder._drop_finished()
        joining, _ = decoder._admit()
        decoder.active += joining
        if waiting_long in joining:
            break
    assert round == 0 and waiting_long in decoder.active


def test_one_client_holds_at_most_its_share_of_seats_and_of_the_queue(model64):
    decoder = BatchedDecoder(model64, max_batch=4, max_per_client=2, max_queued_per_client=3)
    mine = [short("a", seed=i) for i in range(3)]
    for r in mine:
        decoder.submit(r)
    with pytest.raises(ClientQueueFull, match="3 of your requests are waiting"):
        decoder.submit(short("a"))
    decoder.submit(short(None))  # a request no client names (in-process) has no per-client caps
    decoder.submit(short("b"))
    joining, _ = decoder._admit()
    assert sum(r.client == "a" for r in joining) == 2 and len(joining) == 4 and decoder.pending == [mine[2]]


def test_a_join_computes_one_row_of_gates_and_a_leave_rebuilds_nothing(model64, monkeypatch):
    """Requests come and go through the slots (more requests than seats, leaving in another order than they
    came); the gates are computed once per request, and each block of slots gets its executor once."""
    made = []
    gates = model64.gates
    monkeypatch.setattr(model64, "gates", lambda dial, *rest: (made.append(dial.point.shape), gates(dial, *rest))[1])
    requests = [request(a, seed=i, top_k=None, n=n) for i, (a, n) in enumerate([(0.1, 9), (0.8, 3), (0.4, 14),
                                                                                 (0.6, 5), (0.3, 11), (0.9, 7)])]
    decoder = decode(model64, requests[:3], max_batch=2, join_later=requests[3:])
    assert made == [(1,)] * len(requests)  # one row each, when it joined
    assert set(decoder.block_executors) <= {(a, b) for a in range(3) for b in range(a + 1, 4)}
    for mine in requests:  # slots handed over (keys, values and gates) mid-generation change no token
        alone = request(mine.generation.dial, seed=mine.generation.seed, top_k=None, n=mine.generation.max_new_tokens)
        decode(model64, [alone])
        assert mine.tokens == alone.tokens
