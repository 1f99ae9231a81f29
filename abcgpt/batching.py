"""Batched decoding for many users at once, each at their own alpha (the serving side of the dial).

Requests in flight are decoded together: one forward per decoding step for every
request that has a cache position left, with one alpha per row (the per-row gate:
the fused kernel on CUDA, the reference backend elsewhere). Each request owns a slot
of a SlotCache at its own position. The busy slots are kept at the front, in one
block, so a step reads and writes the cache in place, with no copy of it; a request
that leaves hands its slot to the last one. Requests join (their prompt is run once,
alone) and leave between steps. A request draws from its own generator through
sampling.draw, the very operations of sampling.generate, so its seed alone decides
its text: it does not depend on who else is being served, and it is what sample.py
prints.

Limits and fairness: a bounded queue (submit raises QueueFull), a deadline per
request, and the shortest requests admitted first. Up to max_batch requests of any
length run at once, and max_batch // 4 more (at least one) are kept for short ones (at most
short_tokens new tokens), so that long requests cannot starve a short one.
A step that fails is run again a request at a time: only the request that fails
ends, with its error, and the others go on.
"""
import asyncio
import time
from dataclasses import dataclass, field

import torch

from .backends import executor_for
from .sampling import draw
from .voice import Dial


class QueueFull(Exception):
    """Every slot is busy and the queue holds as many requests as it may."""


class TimedOut(Exception):
    """A request passed its deadline: it ends with the tokens it has."""


class DecodingFailed(Exception):
    """A step failed for this request even when run alone."""


class SlotCache:
    """Keys and values of up to `slots` sequences, each at its own position; a forward uses a contiguous
    block of slots (rows)."""

    def __init__(self, config, slots, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, slots, config.n_head, config.block_size, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * slots
        self.used = 0  # slots [0, used) are busy

    def take(self):
        """The next free slot, empty."""
        slot, self.used = self.used, self.used + 1
        self.lengths[slot] = 0
        return slot

    def release(self, slot):
        """Free slot; the last busy slot moves into it, and its new index is returned (None if none moved)."""
        last = self.used - 1
        self.used = last
        if slot == last:
            return None
        self.k[:, slot].copy_(self.k[:, last])
        self.v[:, slot].copy_(self.v[:, last])
        self.lengths[slot] = self.lengths[last]
        return slot

    def rows(self, start, stop):
        """What one forward over the slots [start, stop) uses as its cache."""
        return SlotRows(self, start, stop)


class SlotRows:
    """The cache a forward over a block of slots sees (an attention.Cache): a position per row, and a mask
    per row."""

    def __init__(self, cache, start, stop):
        self.cache, self.start, self.stop = cache, start, stop
        self.lengths = torch.tensor(cache.lengths[start:stop], device=cache.k.device)
        self.end = None  # keys in use after this forward: the longest row's
        self.seen = None  # which keys each new query may see: the same in every layer, so made once

    def positions(self, T, device):
        return self.lengths[:, None] + torch.arange(T, device=device)  # (B, T)

    def check(self, T, block_size):
        self.end = max(self.cache.lengths[self.start:self.stop]) + T
        if self.end > block_size:
            raise ValueError(f"sequence of length {self.end} is longer than block_size {block_size}")

    def advance(self, T):
        for s in range(self.start, self.stop):
            self.cache.lengths[s] += T

    def layer(self, index):
        return SlotLayer(self, index)


class SlotLayer:
    def __init__(self, rows, index):
        self.rows, self.index = rows, index

    def update(self, k, v, where):
        """Write k, v (B, nh, T, hs) in place at each row's positions where (B, T); return every row's keys
        and values up to the longest row, and the mask of the keys each new query may see."""
        rows, cache = self.rows, self.rows.cache
        keys, values = (t[self.index, rows.start:rows.stop] for t in (cache.k, cache.v))
        at = where[:, None, :, None].expand(k.shape)
        keys.scatter_(2, at, k.to(keys.dtype))
        values.scatter_(2, at, v.to(values.dtype))
        if rows.seen is None:  # (B, 1, T, end)
            rows.seen = torch.arange(rows.end, device=k.device)[None, None, None, :] <= where[:, None, :, None]
        return keys[:, :, :rows.end], values[:, :, :rows.end], rows.seen


def dial_key(dial):
    """A request's dial as a hashable value: the alpha itself, or a Dial's point and mode."""
    if not isinstance(dial, Dial):
        return dial
    return tuple(dial.point.flatten().tolist()), None if dial.uniform is None else bool(dial.uniform)


@dataclass(eq=False)
class Request:
    """One user's generation: its prompt, dial and sampling settings, and where its tokens go."""

    prompt: list
    alpha: object  # the dial: an alpha (a float) or a voice.Dial for the one sequence
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    mix: float | None = None  # the mix the alpha came from, when the calibrated dial was used
    voice: str | None = None  # the voice the dial came from (a source, a mixture or "all"), when one was named
    timeout: float = float("inf")  # seconds from submission to the last token
    tokens: list = field(default_factory=list)
    slot: int | None = None
    cancelled: bool = False
    error: Exception | None = None  # why it ended before its last token (TimedOut, DecodingFailed), if it did
    started: float = field(default_factory=time.perf_counter)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # new token ids, then None at the end
    generator: torch.Generator | None = None  # made on the model's device at submit, from seed

    @property
    def done(self):
        return self.cancelled or self.error is not None or len(self.tokens) >= self.max_new_tokens


class BatchedDecoder:
    """Decodes every submitted Request, in batches of up to max_batch; run() is its loop."""

    def __init__(self, model, max_batch=32, max_queue=None, short_tokens=64):
        self.model = model.eval()
        self.device = model.lm_head.weight.device
        self.block_size = model.config.block_size
        self.max_batch, self.short_tokens = max_batch, short_tokens
        seats = max_batch + max(1, max_batch // 4)  # the extra ones only for short requests
        self.cache = SlotCache(model.config, seats, self.device, model.lm_head.weight.dtype)
        self.max_queue = 4 * max_batch if max_queue is None else max_queue
        self.pending, self.active = [], []  # active: in slot order, then the windowed ones (no slot)
        self.wake = asyncio.Event()
        self.largest_batch = 0  # the most requests one decoding step has served (for tests and benchmarks)
        self.executors = {}  # alphas of a block of rows: the executor that runs them

    def submit(self, request):
        """Queue a request; its prompt must fit the context (block_size tokens). QueueFull when the queue is."""
        if not 0 < len(request.prompt) <= self.block_size:
            raise ValueError(f"a prompt of {len(request.prompt)} tokens does not fit the context of {self.block_size}")
        if len(self.pending) >= self.max_queue:
            raise QueueFull(f"{len(self.pending)} requests are waiting")
        request.generator = torch.Generator(device=self.device).manual_seed(request.seed)
        self.pending.append(request)
        self.wake.set()

    async def run(self):
        """Forever: let waiting requests join while slots are free, take one step for all, hand out tokens."""
        while True:
            if not self.pending and not self.active:
                self.wake.clear()
                await self.wake.wait()
            self._drop_finished()
            joining = self._admit()
            stepping = list(self.active)
            self.active += joining
            # in the loop's own thread: a step takes milliseconds, and torch run from a second thread was slower
            # here (its own pool of worker threads beside the first); requests are read between steps
            for request, token in self._step_each_alone_if_need_be(joining, stepping):
                request.tokens.append(token)
                request.queue.put_nowait(token)
            for _ in range(4):  # let the server read and answer between steps; a client's leaving takes a few
                await asyncio.sleep(0)  # turns of the loop (socket, protocol, watcher) to cancel its request

    def _admit(self):
        """Pending requests that start now: the least work first, while a slot is free (one per request
        in flight, or a seat for one past the context), and a long one only while fewer than max_batch long
        ones are (the rest are kept for short ones)."""
        now = time.perf_counter()
        for request in self.pending:
            if not request.cancelled and now - request.started > request.timeout:
                request.error = TimedOut(f"no slot came free within the deadline of {request.timeout:g} s")
            if request.done:  # cancelled or timed out before it started
                request.queue.put_nowait(None)
        self.pending = [r for r in self.pending if not r.done]
        joining = []
        long = sum(r.max_new_tokens > self.short_tokens for r in self.active)
        for request in sorted(self.pending, key=lambda r: (r.max_new_tokens, len(r.prompt))):
            is_long = request.max_new_tokens > self.short_tokens
            if len(self.active) + len(joining) < len(self.cache.lengths) and not (is_long and long >= self.max_batch):
                request.slot = self.cache.take()
                long += is_long
                joining.append(request)
        self.pending = [r for r in self.pending if r not in joining]
        return joining

    def _drop_finished(self):
        now = time.perf_counter()
        for request in self.active:
            if not request.done and now - request.started > request.timeout:
                request.error = TimedOut(f"the deadline of {request.timeout:g} s passed after {len(request.tokens)} "
                                         "tokens")
        for request in [r for r in self.active if r.done]:
            self.active.remove(request)
            self._free_slot(request)
            request.queue.put_nowait(None)

    def _free_slot(self, request):
        if request.slot is None:
            return
        moved = self.cache.release(request.slot)
        if moved is not None:  # the last busy slot's request now sits in the freed one
            next(r for r in self.active if r.slot == self.cache.used).slot = moved
        request.slot = None

    def _step_each_alone_if_need_be(self, joining, stepping):
        """One step for all; if it fails, a request at a time from where the step began (the same cache
        lengths and the same uniform draws), so that only a request that fails ends, and the others get the
        very tokens they would have got."""
        uniforms = {r: torch.rand(1, 1, generator=r.generator, device=self.device) for r in joining + stepping}
        before = list(self.cache.lengths)
        try:
            emitted = self._step(joining, stepping, uniforms)
        except Exception:
            emitted, after = [], list(before)
            for request in joining + stepping:
                self.cache.lengths[:] = before
                alone = [request]
                try:
                    emitted += self._step(alone if request in joining else [], alone if request in stepping else [],
                                          uniforms)
                except Exception as e:
                    reason = str(e).splitlines()[0] if str(e) else ""
                    request.error = DecodingFailed(f"decoding failed: {type(e).__name__}: {reason}")
                if request.slot is not None:
                    after[request.slot] = self.cache.lengths[request.slot]
            self.cache.lengths[:] = after
        for request, _ in emitted:  # a sequence that fills the context leaves its slot: its next step is windowed
            if request.slot is not None and len(request.prompt) + len(request.tokens) + 1 > self.block_size:
                self._free_slot(request)
        return emitted

    @torch.no_grad()
    def _step(self, joining, stepping, uniforms):
        """Prompts of the joining requests (one forward for each block of prompts of one length), then one
        token for every stepping request:
        one batched forward over the block of cached rows, one over the rows past block_size (their last
        window, as generate() does once a sequence outgrows the context)."""
        emitted = []
        for length in sorted({len(r.prompt) for r in joining}):  # prompts of one length in a block of slots
            for start, stop, rows in self._blocks([r for r in joining if len(r.prompt) == length]):
                idx = torch.tensor([r.prompt for r in rows], device=self.device)
                logits, _ = self.model(idx, cache=self.cache.rows(start, stop), run=self._executor(rows))
                emitted += self._draw(rows, logits[:, -1, :], uniforms)
        cached = [r for r in stepping if r.slot is not None]
        windowed = [r for r in stepping if r.slot is None]
        self.largest_batch = max(self.largest_batch, len(cached), len(windowed))
        for start, stop, rows in self._blocks(cached):
            idx = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
            logits, _ = self.model(idx, cache=self.cache.rows(start, stop), run=self._executor(rows))
            emitted += self._draw(rows, logits[:, -1, :], uniforms)
        if windowed:
            idx = torch.tensor([(r.prompt + r.tokens)[-self.block_size:] for r in windowed], device=self.device)
            logits, _ = self.model(idx, run=self._executor(windowed))
            emitted += self._draw(windowed, logits[:, -1, :], uniforms)
        return emitted

    @staticmethod
    def _blocks(rows):
        """The rows (sorted by slot) as contiguous blocks of slots: (start, stop, requests)."""
        rows = sorted(rows, key=lambda r: r.slot)
        blocks = []
        for r in rows:
            if blocks and blocks[-1][1] == r.slot:
                blocks[-1] = (blocks[-1][0], r.slot + 1, blocks[-1][2] + [r])
            else:
                blocks.append((r.slot, r.slot + 1, [r]))
        return blocks

    def _executor(self, requests):
        """What runs a forward over these requests' rows: made once (gates and all) while the same requests
        sit in the same rows, which is most steps."""
        key = tuple(dial_key(r.alpha) for r in requests)
        if key not in self.executors:
            if len(self.executors) >= 8:  # the blocks of the last few compositions
                self.executors.clear()
            dials = None
            if self.model.config.gated:  # one row per request; an alpha is a line Dial
                dials = Dial.stack([r.alpha if isinstance(r.alpha, Dial) else Dial.alpha(r.alpha) for r in requests])
            self.executors[key] = executor_for(self.model, dials, len(requests), self.device)
        return self.executors[key]

    def _draw(self, requests, logits, uniforms):
        """A token for each request's row of logits, from its uniform draw of this step."""
        u = torch.cat([uniforms[r] for r in requests])
        temperature = torch.tensor([[r.temperature] for r in requests], device=self.device)
        top_k = None
        if any(r.top_k is not None and r.top_k < logits.size(-1) for r in requests):  # else no sort to pay
            top_k = torch.tensor([[r.top_k or logits.size(-1)] for r in requests], device=self.device)
        tokens = draw(logits, temperature, top_k, u).flatten().tolist()
        return list(zip(requests, tokens))
