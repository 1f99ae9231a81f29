"""Character n-gram language models, to tell which source a text reads like (docs/design.md, section 5).

Each source gets an interpolated model of orders 0..n fitted on its train split:
P(c | h) = sum over k of lambda_k * count(h_k c) / count(h_k), with h_k the last k
characters, plus a uniform floor so unseen characters keep some probability.
P(source k | text) then follows from Bayes with equal priors, for two sources or many.
"""
import math

import numpy as np


class CharNgram:
    def __init__(self, text, alphabet, order=4, floor=1e-4):
        """alphabet: every character that may be scored (shared by the models compared)."""
        self.order = order
        self.index = {c: i for i, c in enumerate(alphabet)}
        self.size = len(alphabet) + 1  # one id for characters outside the alphabet
        self.floor = floor
        ids = self.encode(text)
        self.tables = [self._count(ids, k) for k in range(order + 1)]

    def encode(self, text):
        unknown = self.size - 1
        return np.array([self.index.get(c, unknown) for c in text], dtype=np.int64)

    def _keys(self, ids, k, length):
        """Integer keys of the k characters before each of the last `length` positions, and with it."""
        n = len(ids)
        context = np.zeros(length, dtype=np.int64)
        for j in range(k, 0, -1):  # oldest character first
            context = context * self.size + ids[n - length - j : n - j]
        return context, context * self.size + ids[n - length :]

    def _count(self, ids, k):
        context, full = self._keys(ids, k, len(ids) - self.order)
        ctx_keys, ctx_counts = np.unique(context, return_counts=True)
        full_keys, full_counts = np.unique(full, return_counts=True)
        return ctx_keys, ctx_counts, full_keys, full_counts

    @staticmethod
    def _lookup(keys, counts, query):
        at = np.searchsorted(keys, query).clip(max=len(keys) - 1)
        return np.where(keys[at] == query, counts[at], 0)

    def log_probs(self, text):
        """Natural-log probability of each character of text after the first `order`."""
        ids = self.encode(text)
        length = len(ids) - self.order
        if length <= 0:
            return np.zeros(0)
        prob = np.full(length, self.floor / self.size)
        weight = (1.0 - self.floor) / (self.order + 1)  # equal weights over the orders
        for k, (ctx_keys, ctx_counts, full_keys, full_counts) in enumerate(self.tables):
            context, full = self._keys(ids, k, length)
            seen = self._lookup(ctx_keys, ctx_counts, context)
            hits = self._lookup(full_keys, full_counts, full)
            # an unseen context gives its weight to the unigram estimate's share: uniform here
            prob += weight * np.where(seen > 0, hits / np.maximum(seen, 1), 1.0 / self.size)
        return np.log(prob)


class SourceClassifier:
    """P(source k | text) from one character n-gram model per source and equal priors."""

    def __init__(self, *texts, order=4):
        if len(texts) < 2:
            raise ValueError(f"telling sources apart needs at least two texts, got {len(texts)}")
        alphabet = sorted(set().union(*map(set, texts)))
        self.models = tuple(CharNgram(text, alphabet, order) for text in texts)

    def log_likelihoods(self, text):
        """log P(text | source k) for every source k."""
        return np.array([model.log_probs(text).sum() for model in self.models])

    def classify(self, text):
        """The index of the source text most likely came from."""
        return int(np.argmax(self.log_likelihoods(text)))

    def log_odds(self, text):
        """Two sources: log P(text | source 1) - log P(text | source 0)."""
        z = self.log_likelihoods(text)
        return float(z[1] - z[0])

    def p_source_1(self, text):
        z = self.log_odds(text)
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def spearman(x, y):
    """Rank correlation (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
