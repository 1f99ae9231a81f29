"""Batched decoding for many users at once, each at their own alpha (the serving side of the dial).

Requests in flight are decoded together: one forward per decoding step for every
request that has a cache position left, with one alpha per row (the per-row gate:
the fused kernel on CUDA, the reference backend elsewhere). Each request owns a slot
of a SlotCache at its own position, with its row of gates beside its keys and values.
The busy slots are kept at the front, in one block, so a step reads and writes the
cache in place, with no copy of it; a request that leaves hands its slot (and its
gates) to the last one. Requests join (their prompt is run once, alone) and leave
between steps; a join computes one row of gates and a leave copies one, and nothing
else is rebuilt. A request draws from its own generator through sampling.draw, the
very operations of sampling.generate, so its seed alone decides its text: it does
not depend on who else is being served, and it is what sample.py prints.

The steps run on a thread apart from the server's event loop (serve(), on the thread
that loaded the model; or run(), in a worker thread), so the loop stays free to answer
while a step computes; tokens are handed to each request's queue on that loop.

Limits and fairness: a bounded queue (submit raises QueueFull), a deadline per
request, and turns shared between clients. A request names its client (the server
uses the peer address); admission goes to the client that was served least recently,
and within a client to its oldest request, so every waiting request moves up with
each admission and none waits for ever. One client may hold at most max_per_client
seats and have max_queued_per_client requests waiting (ClientQueueFull past that).
Up to max_batch requests of any length run at once, and max_batch // 4 more (at
least one) are kept for short ones (at most short_tokens new tokens), so that long
requests cannot starve a short one. A step that fails is run again a request at a
time: only the request that fails ends, with its error, and the others go on.
"""
import asyncio
import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from abcgpt.backends.registry import choose, ungated
from abcgpt.gates.gate import Gates
from abcgpt.gates.voice import Dial, prepare
from abcgpt.model.attention import KVCache
from abcgpt.model.sampling import Generation, draw_rows

log = logging.getLogger(__name__)
REMEMBERED_CLIENTS = 4096  # clients whose last turn is kept; one forgotten longer ago counts as new


class QueueFull(Exception):
    """Every slot is busy and the queue holds as many requests as it may."""


class ClientQueueFull(QueueFull):
    """This request's client already has as many requests waiting as one client may."""


class TimedOut(Exception):
    """A request passed its deadline: it ends with the tokens it has."""


class Stopped(Exception):
    """The decoder stopped (the server is shutting down) before this request ended."""


class DecodingFailed(Exception):
    """A step failed for this request even when run alone."""


class SlotCache:
    """Up to `slots` sequences being decoded: which slots are taken, each one's row of gates, and their keys
    and values (kv, one attention.KVCache, each row at its own position); a forward uses a contiguous block
    of slots (rows)."""

    def __init__(self, config, slots):
        self.kv = KVCache(slots, config.block_size)
        self.used = 0  # slots [0, used) are busy
        self.gates = None  # each group's gates, (slots, n): a slot's row is its request's, made when it joined

    @property
    def lengths(self):
        """Each slot's positions filled: the cache's own list."""
        return self.kv.lengths

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
        self.kv.move(last, slot)
        if self.gates is not None:
            for table in self.gates.groups():
                table[slot].copy_(table[last])
        return slot

    def set_gates(self, slot, row):
        """Put one request's gates (a Gates of (1, n) rows) in slot's row."""
        if self.gates is None:
            self.gates = row.map(lambda g: g.new_zeros((len(self.lengths), g.size(-1))))
        for table, gate in zip(self.gates.groups(), row.groups()):
            table[slot].copy_(gate[0])

    def gates_of(self, start, stop):
        """The gates of the slots [start, stop): views of the table, so a row written later is read there too."""
        block = self.gates.map(lambda table: table[start:stop])
        return Gates(block.embd, block.heads, block.hidden)

    def rows(self, start, stop):
        """What one forward over the slots [start, stop) uses as its cache."""
        return self.kv.rows(start, stop)


@dataclass(eq=False)
class Request:
    """One user's generation: its prompt, the Generation it asks for, and where its tokens go."""

    prompt: list
    generation: Generation  # its dial (an alpha, or a voice.Dial for the one sequence), sampling, seed, length
    mix: float | None = None  # the mix the alpha came from, when the calibrated dial was used
    voice: str | None = None  # the voice the dial came from (a source, a mixture or "all"), when one was named
    timeout: float = float("inf")  # seconds from submission to the last token
    client: object = None  # who asked (the server: the peer's address), for fair turns; None: no one's, no caps
    streamed: bool = True  # each token is put in the queue as it comes; False: only the end (a caller that waits)
    tokens: list = field(default_factory=list)
    slot: int | None = None
    cancelled: bool = False
    error: Exception | None = None  # why it ended before its last token (TimedOut, DecodingFailed), if it did
    started: float = field(default_factory=time.perf_counter)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # new token ids, then None at the end
    generator: torch.Generator | None = None  # made on the model's device when it joins, from its seed
    gates: Gates | None = None  # its own row of gates, (1, n) each, made when it joins

    @property
    def done(self):
        return self.cancelled or self.error is not None or len(self.tokens) >= self.generation.max_new_tokens


class BatchedDecoder:
    """Decodes every submitted Request, in batches of up to max_batch: serve() on the caller's thread, or run() in
    a thread of its own."""

    def __init__(self, model, max_batch=32, max_queue=None, short_tokens=64, max_per_client=None,
                 max_queued_per_client=None):
        self.model = model.eval()
        self.device = model.lm_head.weight.device
        self.block_size = model.config.block_size
        self.max_batch, self.short_tokens = max_batch, short_tokens
        seats = max_batch + max(1, max_batch // 4)  # the extra ones only for short requests
        self.cache = SlotCache(model.config, seats)
        self.max_queue = 4 * max_batch if max_queue is None else max_queue
        # an eighth of the batch: on a CPU a step costs about as much per row as it serves, so every row a
        # client holds slows everyone's steps; eight clients can be served in full at once
        self.max_per_client = max(1, max_batch // 8) if max_per_client is None else max_per_client
        self.max_queued_per_client = max_batch if max_queued_per_client is None else max_queued_per_client
        self.pending, self.active = [], []  # active: in slot order, then the windowed ones (no slot)
        self.lock = threading.Lock()  # pending is appended to by submit() and taken from by the worker
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.turns = OrderedDict()  # client: the number of its last admission (the least recent first)
        self.admissions = 0
        self.largest_batch = 0  # the most requests one decoding step has served (for tests and benchmarks)
        self.block_executors = {}  # (start, stop) of a block of slots: what runs a forward over it
        self.windowed = (), None  # the requests past the context last stepped, and what ran them

    def submit(self, request):
        """Queue a request; its prompt must fit the context (block_size tokens). QueueFull when the queue is,
        ClientQueueFull when its client's share of it is. Safe from any thread."""
        if not 0 < len(request.prompt) <= self.block_size:
            raise ValueError(f"a prompt of {len(request.prompt)} tokens does not fit the context of {self.block_size}")
        with self.lock:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are waiting")
            if request.client is not None:
                mine = sum(r.client == request.client for r in self.pending)
                if mine >= self.max_queued_per_client:
                    raise ClientQueueFull(f"{mine} of your requests are waiting, the most one client may have")
            self.pending.append(request)
        self.wake.set()

    def serve(self, loop):
        """Decode on this thread until stop(), handing each token to its request's queue on loop (the server's
        event loop, running in another thread). Torch's CPU thread pool runs at full speed on the thread that
        made it (the one that loaded the model) and at about half that on a second one, so serve.py decodes
        on its main thread and runs the server beside it."""
        try:
            self._work(loop)
        finally:
            self._end_everything(loop)
            self.stopping.clear()  # ready to serve again

    def _end_everything(self, loop):
        """End every request still here, waiting or decoding, with Stopped: their callers answer now rather than
        wait on a decoder that is gone. The cache is left empty."""
        with self.lock:
            left, self.pending = self.pending + self.active, []
        self.active = []
        for request in left:
            request.slot = None
            if not request.done:
                request.error = Stopped("the server stopped before this request ended")
        self.cache.used = 0
        if left and not loop.is_closed():
            loop.call_soon_threadsafe(_hand_out, [(r, None) for r in left])

    def stop(self):
        """End serve() after the step it is in. Safe from any thread, or a signal handler."""
        self.stopping.set()
        self.wake.set()

    async def run(self):
        """serve() in a worker thread of its own until this task is cancelled: for a server whose caller has no
        thread to give the decoder (a test's, a notebook's)."""
        loop = asyncio.get_running_loop()
        worker = threading.Thread(target=self.serve, args=(loop,), name="decoder", daemon=True)
        worker.start()
        try:
            await loop.create_future()  # never set: the task runs until it is cancelled
        finally:
            self.stop()
            worker.join()  # within a step: nothing is handed to the loop once run() has returned

    def _work(self, loop):
        """The worker's loop: let waiting requests join while seats are free, take one step for all, hand out
        tokens (and each finished request's end, None) to the event loop in one call per step."""
        with torch.no_grad():
            while not self.stopping.is_set():
                if not self.pending and not self.active:
                    self.wake.wait()
                    self.wake.clear()
                    continue
                try:
                    handed = [(r, None) for r in self._drop_finished()]
                    joining, refused = self._admit()
                    handed += [(r, None) for r in refused]
                    stepping = list(self.active)
                    self.active += joining
                    for request, token in self._step_each_alone_if_need_be(joining, stepping):
                        request.tokens.append(token)
                        if request.streamed:
                            handed.append((request, token))
                except Exception:  # a fault outside any one request's step: log it, and go on with the next step
                    log.exception("the decoder's loop failed")
                    continue
                if handed:
                    loop.call_soon_threadsafe(_hand_out, handed)

    def _admit(self):
        """(joining, ended): the pending requests that start now, and those that end before starting (cancelled,
        past the deadline, or a dial that cannot be served). A free seat goes to the client served least
        recently, and within a client to its oldest request; one client holds at most max_per_client seats, and
        long requests at most max_batch (the other seats are kept for short ones)."""
        now, ended = time.perf_counter(), []
        with self.lock:
            for request in self.pending:
                if not request.cancelled and now - request.started > request.timeout:
                    request.error = TimedOut(f"no slot came free within the deadline of {request.timeout:g} s")
                if request.done:  # cancelled or timed out before it started
                    ended.append(request)
            waiting = [r for r in self.pending if not r.done]
        joining = []
        seats = len(self.cache.lengths) - len(self.active)
        long = sum(self._long(r) for r in self.active)
        held = Counter(r.client for r in self.active if r.client is not None)
        while len(joining) < seats:
            may_start = [r for r in waiting
                         if not (self._long(r) and long >= self.max_batch)
                         and (r.client is None or held[r.client] < self.max_per_client)]
            if not may_start:
                break
            request = min(may_start, key=lambda r: (self.turns.get(r.client, -1), r.started))
            waiting.remove(request)
            if not self._prepare(request):
                ended.append(request)
                continue
            request.slot = self.cache.take()
            if request.gates is not None:
                self.cache.set_gates(request.slot, request.gates)
            long += self._long(request)
            held[request.client] += request.client is not None
            self._took_a_turn(request.client)
            joining.append(request)
        gone = {id(r) for r in joining + ended}
        with self.lock:
            self.pending = [r for r in self.pending if id(r) not in gone]
        return joining, ended

    def _long(self, request):
        return request.generation.max_new_tokens > self.short_tokens

    def _took_a_turn(self, client):
        self.turns[client] = self.admissions
        self.turns.move_to_end(client)
        self.admissions += 1
        if len(self.turns) > REMEMBERED_CLIENTS:
            self.turns.popitem(last=False)

    def _prepare(self, request):
        """Give a joining request its generator and its row of gates; False (with its error) where its dial
        cannot be served."""
        request.generator = torch.Generator(device=self.device)
        if request.generation.seed is None:
            request.generator.seed()  # a fresh one, at random
        else:
            request.generator.manual_seed(request.generation.seed)
        if not self.model.config.gated:
            return True
        try:
            dial = request.generation.dial
            dial = dial if isinstance(dial, Dial) else Dial.alpha(dial)
            dial = Dial.stack([dial])  # one row: the table's shape
            dial = prepare(dial, self.model.config.geometry, 1, self.model.config.n_sources).to(self.device)
            request.gates = self.model.gates(dial)
        except Exception as e:
            request.error = DecodingFailed(f"decoding failed: {type(e).__name__}: {_first_line(e)}")
            return False
        return True

    def _drop_finished(self):
        """The active requests that are done (their deadline passed, cancelled, or at their last token), each
        out of its slot."""
        now = time.perf_counter()
        for request in self.active:
            if not request.done and now - request.started > request.timeout:
                request.error = TimedOut(f"the deadline of {request.timeout:g} s passed after {len(request.tokens)} "
                                         "tokens")
        finished = [r for r in self.active if r.done]
        for request in finished:
            self.active.remove(request)
            self._free_slot(request)
        return finished

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
                    request.error = DecodingFailed(f"decoding failed: {type(e).__name__}: {_first_line(e)}")
                if request.slot is not None:
                    after[request.slot] = self.cache.lengths[request.slot]
            self.cache.lengths[:] = after
        for request, _ in emitted:  # a sequence that fills the context leaves its slot: its next step is windowed
            if request.slot is not None and len(request.prompt) + len(request.tokens) + 1 > self.block_size:
                self._free_slot(request)
        return emitted

    def _step(self, joining, stepping, uniforms):
        """Prompts of the joining requests (one forward for each block of prompts of one length), then one
        token for every stepping request:
        one batched forward over the block of cached rows, one over the rows past block_size (their last
        window, as generate() does once a sequence outgrows the context)."""
        emitted = []
        for length in sorted({len(r.prompt) for r in joining}):  # prompts of one length in a block of slots
            for start, stop, rows in self._blocks([r for r in joining if len(r.prompt) == length]):
                idx = torch.tensor([r.prompt for r in rows], device=self.device)
                emitted += self._draw(rows, self._forward(rows, idx, (start, stop)), uniforms)
        cached = [r for r in stepping if r.slot is not None]
        windowed = [r for r in stepping if r.slot is None]
        self.largest_batch = max(self.largest_batch, len(cached), len(windowed))
        for start, stop, rows in self._blocks(cached):
            idx = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
            emitted += self._draw(rows, self._forward(rows, idx, (start, stop)), uniforms)
        if windowed:
            idx = torch.tensor([(r.prompt + r.tokens)[-self.block_size:] for r in windowed], device=self.device)
            emitted += self._draw(windowed, self._forward(windowed, idx, None), uniforms)
        return emitted

    def _forward(self, requests, idx, slots):
        """The last position's logits of one forward over these requests' rows: in the cache's slots
        (start, stop), or (slots None) over their whole windows, with no cache."""
        cache = None if slots is None else self.cache.rows(*slots)
        logits, _ = self.model(idx, cache=cache, run=self._executor(requests, slots))
        return logits[:, -1, :]

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

    def _executor(self, requests, slots):
        """What runs a forward over these requests' rows. A block of slots reads its gates from the cache's
        table, so its executor is made once and stays right as requests come and go; the windowed rows (a
        few, past the context) get theirs from the requests' own rows, made again only when they change."""
        if not self.model.config.gated:
            return ungated()
        backend = choose(self.model.backend, self.device, per_row=True)
        if slots is not None:
            if slots not in self.block_executors:
                self.block_executors[slots] = backend.build(self.model, self.cache.gates_of(*slots), None)
            return self.block_executors[slots]
        key = tuple(requests)  # the requests themselves: by identity
        if self.windowed[0] != key:
            self.windowed = key, backend.build(self.model, _stacked([r.gates for r in requests]), None)
        return self.windowed[1]

    def _draw(self, requests, logits, uniforms):
        """A token for each request's row of logits, from its uniform draw of this step."""
        u = torch.cat([uniforms[r] for r in requests])
        tokens = draw_rows(logits, [r.generation.sampling for r in requests], u).flatten().tolist()
        return list(zip(requests, tokens))


def _hand_out(handed):
    """On the event loop: each (request, token) to its request's queue; None ends a request."""
    for request, token in handed:
        request.queue.put_nowait(token)


def _stacked(rows):
    """One Gates of the requests' rows, in their order."""
    embd, heads, hidden = (list(parts) for parts in zip(*((g.embd, g.heads, g.hidden) for g in rows)))
    return Gates(torch.cat(embd), [torch.cat(layer) for layer in zip(*heads)],
                 [torch.cat(layer) for layer in zip(*hidden)])


def _first_line(e):
    return str(e).splitlines()[0] if str(e) else ""
