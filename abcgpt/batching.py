"""Batched decoding for many users at once, each at their own alpha (the serving side of the dial).

Requests in flight are decoded together: one forward per decoding step for every
request that has a cache position left, with one alpha per row (the per-row gate:
the fused kernel on CUDA, the reference backend elsewhere). Each request owns a slot
of a SlotCache, at its own position; requests join (their prompt is run once, alone)
and leave between steps. A request draws from its own generator, with the very
operations of sampling.generate, so its seed alone decides its text: the text does
not depend on who else is being served, and it is what sample.py prints.
"""
import asyncio
import time
from dataclasses import dataclass, field

import torch

from .sampling import sample_next


class SlotCache:
    """Keys and values of up to `slots` sequences, each at its own position."""

    def __init__(self, config, slots, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, slots, config.n_head, config.block_size, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * slots
        self.free = list(range(slots))[::-1]

    def rows(self, slots):
        """What one forward over these slots uses as its cache."""
        return SlotRows(self, slots)


class SlotRows:
    """The cache a forward over some slots sees (an attention.Cache): per-row positions, and a mask per row."""

    def __init__(self, cache, slots):
        self.cache = cache
        self.slots = list(slots)
        self.index = torch.tensor(self.slots, device=cache.k.device)
        self.start = torch.tensor([cache.lengths[s] for s in self.slots], device=cache.k.device)

    def positions(self, T, device):
        return self.start[:, None] + torch.arange(T, device=device)  # (B, T)

    def check(self, T, block_size):
        longest = max(self.cache.lengths[s] for s in self.slots) + T
        if longest > block_size:
            raise ValueError(f"sequence of length {longest} is longer than block_size {block_size}")

    def advance(self, T):
        for s in self.slots:
            self.cache.lengths[s] += T

    def layer(self, index):
        return SlotLayer(self, index)


class SlotLayer:
    def __init__(self, rows, index):
        self.rows, self.index = rows, index

    def update(self, k, v, where):
        """Write k, v (B, nh, T, hs) at each row's positions where (B, T); return every row's keys and values
        and the mask of the keys each new query may see (its own past and itself)."""
        rows, cache = self.rows, self.rows.cache
        slots = rows.index[:, None].expand_as(where)
        cache.k[self.index][slots, :, where] = k.transpose(1, 2).to(cache.k.dtype)
        cache.v[self.index][slots, :, where] = v.transpose(1, 2).to(cache.v.dtype)
        keys = torch.arange(cache.k.size(3), device=k.device)
        mask = keys[None, None, None, :] <= where[:, None, :, None]  # (B, 1, T, block)
        return cache.k[self.index][rows.index], cache.v[self.index][rows.index], mask


@dataclass(eq=False)
class Request:
    """One user's generation: its prompt, dial and sampling settings, and where its tokens go."""

    prompt: list
    alpha: float
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    mix: float | None = None  # the mix the alpha came from, when the calibrated dial was used
    tokens: list = field(default_factory=list)
    slot: int | None = None
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # new token ids, then None at the end
    generator: torch.Generator | None = None  # made on the model's device at submit, from seed

    @property
    def done(self):
        return self.cancelled or len(self.tokens) >= self.max_new_tokens


class BatchedDecoder:
    """Decodes every submitted Request, in batches of up to max_batch; run() is its loop."""

    def __init__(self, model, max_batch=32):
        self.model = model.eval()
        self.device = model.lm_head.weight.device
        self.block_size = model.config.block_size
        self.cache = SlotCache(model.config, max_batch, self.device, model.lm_head.weight.dtype)
        self.pending, self.active = [], []
        self.wake = asyncio.Event()
        self.largest_batch = 0  # the most requests one decoding step has served (for tests and benchmarks)

    def submit(self, request):
        """Queue a request; its prompt must fit the context (block_size tokens)."""
        if not 0 < len(request.prompt) <= self.block_size:
            raise ValueError(f"a prompt of {len(request.prompt)} tokens does not fit the context of {self.block_size}")
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
            joining = []
            while self.pending and self.cache.free:
                request = self.pending.pop(0)
                if not request.cancelled:
                    request.slot = self.cache.free.pop()
                    self.cache.lengths[request.slot] = 0
                    joining.append(request)
            stepping = [r for r in self.active if not r.done]
            self.active += joining
            try:
                emitted = await asyncio.to_thread(self._step, joining, stepping)
            except Exception as e:  # a failed step ends its requests, not the server
                print(f"decoding step failed: {type(e).__name__}: {e}")
                for request in joining + stepping:
                    request.cancelled = True
                emitted = []
            for request, token in emitted:
                request.tokens.append(token)
                request.queue.put_nowait(token)
            self._drop_finished()

    def _drop_finished(self):
        for request in [r for r in self.active if r.done]:
            self.active.remove(request)
            self.cache.free.append(request.slot)
            request.queue.put_nowait(None)

    @torch.no_grad()
    def _step(self, joining, stepping):
        """Prompts of the joining requests (one forward each), then one token for every stepping request:
        one batched forward over the cached rows, one over the rows past block_size (their last window)."""
        emitted = []
        for request in joining:
            idx = torch.tensor([request.prompt], device=self.device)
            logits, _ = self.model(idx, self._alphas([request]), cache=self.cache.rows([request.slot]))
            emitted.append((request, self._draw(request, logits[:, -1, :])))
        cached = [r for r in stepping if len(r.prompt) + len(r.tokens) <= self.block_size]
        windowed = [r for r in stepping if len(r.prompt) + len(r.tokens) > self.block_size]
        self.largest_batch = max(self.largest_batch, len(cached), len(windowed))
        if cached:
            idx = torch.tensor([[r.tokens[-1]] for r in cached], device=self.device)
            logits, _ = self.model(idx, self._alphas(cached), cache=self.cache.rows([r.slot for r in cached]))
            emitted += [(r, self._draw(r, logits[i, -1:, :])) for i, r in enumerate(cached)]
        if windowed:  # as generate() does once a sequence outgrows the context: recompute its last window
            idx = torch.tensor([(r.prompt + r.tokens)[-self.block_size:] for r in windowed], device=self.device)
            logits, _ = self.model(idx, self._alphas(windowed))
            emitted += [(r, self._draw(r, logits[i, -1:, :])) for i, r in enumerate(windowed)]
        return emitted

    def _alphas(self, requests):
        return torch.tensor([r.alpha for r in requests], dtype=torch.float32) if self.model.config.gated else None

    @staticmethod
    def _draw(request, logits):
        return int(sample_next(logits, request.temperature, request.top_k, request.generator))
