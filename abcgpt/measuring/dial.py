"""The calibrated dial: how much of source 1's voice generated text has at each alpha, and the
monotone map from a user's mix (the share of source 1's voice they ask for) to the alpha that gives it
(docs/design.md, section 5).

The curve is measured by sampling at fixed seeds on a grid of alphas and scoring each
sample with character n-gram models of the sources (ngram.SourceClassifier). The map
is the inverse of that curve after isotonic regression, stored in the checkpoint as
{"alpha": grid, "p": fitted P(source 1)}.
"""
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from abcgpt.model.sampling import PLAIN, Generation, generate

from .ngram import SourceClassifier

CALIBRATION = PLAIN  # what the curve is sampled at; stored with the map


def prompt_ids(tokenizer):
    """A neutral start: a newline where the vocabulary has one."""
    try:
        return tokenizer.encode("\n")
    except ValueError:
        return [0]


def sample_texts(model, tokenizer, alpha, n, tokens, seed, device, sampling=CALIBRATION):
    start = prompt_ids(tokenizer)
    idx = torch.tensor([start] * n, dtype=torch.long, device=device)
    out = generate(model, idx, Generation(alpha, sampling, seed, tokens))
    return [tokenizer.decode(row[len(start):]) for row in out.tolist()]


def classifier_for(corpus):
    """Character n-gram models of the two sources, fitted on their train splits."""
    return SourceClassifier(*(corpus.tokenizer.decode(ids.tolist()) for ids in corpus.train))


def measure(model, tokenizer, classifier, alphas, n_samples, tokens, seed, device, desc="calibration samples"):
    """{alpha: [P(source 1 | sample), ...]}: n_samples samples at each alpha, each alpha its own seed."""
    return {
        a: [classifier.p_source_1(t) for t in sample_texts(model, tokenizer, a, n_samples, tokens, seed + i, device)]
        for i, a in enumerate(tqdm(alphas, desc=desc, unit="alpha", leave=False))
    }


def isotonic(y, weights=None):
    """The non-decreasing sequence closest to y in weighted least squares (pool adjacent violators)."""
    blocks = []  # [mean, weight, length]
    for value, weight in zip(map(float, y), weights if weights is not None else [1.0] * len(y)):
        blocks.append([value, float(weight), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, weight, length = blocks.pop()
            previous = blocks[-1]
            total = previous[1] + weight
            blocks[-1] = [(previous[0] * previous[1] + mean * weight) / total, total, previous[2] + length]
    return [mean for mean, _, length in blocks for _ in range(length)]


def fit_map(scores):
    """The dial map from measured scores {alpha: [P, ...]}: each alpha's mean P, made non-decreasing, with
    the sampling settings it holds at."""
    alphas = sorted(scores)
    means = [float(np.mean(scores[a])) for a in alphas]
    return {"alpha": [float(a) for a in alphas], "p": isotonic(means, [len(scores[a]) for a in alphas]),
            **asdict(CALIBRATION)}


def mix_to_alpha(dial_map, mix):
    """The alpha whose fitted P(source 1) equals mix, by linear interpolation of the inverse curve;
    on a flat stretch inside the curve, its middle; at or beyond the curve's ends, the end of the dial."""
    alphas, p = np.asarray(dial_map["alpha"], float), np.asarray(dial_map["p"], float)
    if mix <= p[0]:
        return float(alphas[0])
    if mix >= p[-1]:
        return float(alphas[-1])
    flat = alphas[p == mix]
    if len(flat):
        return float(flat.mean())
    upper = int(np.searchsorted(p, mix, side="right"))  # p[upper - 1] < mix < p[upper]
    lower = upper - 1
    t = (mix - p[lower]) / (p[upper] - p[lower])
    return float(alphas[lower] + t * (alphas[upper] - alphas[lower]))
