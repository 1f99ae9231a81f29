"""The dial, measured: each source's held-out loss over a sweep of alpha (docs/design.md, section 5).

val_loss is the one definition of held-out loss: the trainer's evaluations and
evaluate.py both call it, so on the same windows they give the same number."""
import torch

from abcgpt.data.corpus import source_alphas
from abcgpt.gates.voice import UNIFORM, voices

SWEEP = tuple(round(0.1 * i, 1) for i in range(11))


@torch.no_grad()
def val_loss(model, ids, alpha, batch_size=32, max_windows=None, device="cpu"):
    """Mean next-token loss over non-overlapping block_size windows of ids (evenly thinned
    to max_windows if given), so every val token is scored once and the result is repeatable."""
    block_size = model.config.block_size
    n_windows = (len(ids) - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"{len(ids)} val tokens are fewer than one block of {block_size} + 1")
    starts = torch.arange(n_windows) * block_size
    if max_windows is not None and max_windows < n_windows:
        starts = starts[torch.linspace(0, n_windows - 1, max_windows).round().long()]
    offsets = torch.arange(block_size + 1)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch_starts in starts.split(batch_size):
        windows = ids[batch_starts[:, None] + offsets].to(device)
        _, loss = model(windows[:, :-1], alpha, windows[:, 1:])
        total += loss.double() * windows[:, 1:].numel()  # summed on the device: one sync, at the end
        count += windows[:, 1:].numel()
    return total.item() / count


def sweep(model, corpus, alphas=SWEEP, batch_size=32, max_windows=None, device="cpu", progress=False):
    """{source name: [val loss at each alpha]}; every source's own corner is included in alphas.
    progress: show a progress bar over the (source, alpha) pairs."""
    alphas = sorted(set(alphas) | set(source_alphas(len(corpus.names))))
    return alphas, held_out_grid(model, corpus, alphas, batch_size, max_windows, device, progress, "alpha")


def held_out_grid(model, corpus, dials, batch_size, max_windows, device, progress, unit):
    """{source name: [val loss at each dial]}, with a progress bar over the (source, dial) pairs."""
    from tqdm.auto import tqdm

    model.eval()
    pairs = [(name, ids, dial) for name, ids in zip(corpus.names, corpus.val) for dial in dials]
    losses = {name: [] for name in corpus.names}
    for name, ids, dial in tqdm(pairs, desc="held-out sweep", unit=unit, disable=not progress, leave=False):
        losses[name].append(val_loss(model, ids, dial, batch_size, max_windows, device))
    return losses


def summarize(names, alphas, losses):
    """The section 5 numbers from a sweep.

    corner: each source's loss at its own alpha; diag: their sum (lower is better);
    contrast: a source's mean loss at the other sources' corners minus at its own
    (the higher, the more the dial controls); middle: mean loss over sources at
    alpha 0.5; best_alpha: where each source's loss is lowest.
    """
    at = {name: dict(zip(alphas, losses[name])) for name in names}
    summary = {**corners(names, at, dict(zip(names, source_alphas(len(names))))),
               "best_alpha": {name: min(alphas, key=lambda a: at[name][a]) for name in names}}
    if 0.5 in alphas:
        summary["middle"] = sum(at[name][0.5] for name in names) / len(names)
    return summary


def corners(names, at, own):
    """corner_loss, diag and contrast from at[source][setting] and each source's own setting (own[source])."""
    corner = {name: at[name][own[name]] for name in names}
    contrast = {
        name: sum(at[name][own[other]] for other in names if other != name) / (len(names) - 1) - corner[name]
        for name in names
    }
    return {"corner_loss": corner, "diag": sum(corner.values()), "contrast": contrast}


def format_table(names, alphas, losses, summary):
    width = max(10, *(len(n) + 2 for n in names))
    lines = ["alpha " + "".join(f"{n:>{width}}" for n in names)]
    for i, a in enumerate(alphas):
        lines.append(f"{a:5.2f} " + "".join(f"{losses[n][i]:>{width}.4f}" for n in names))
    lines.append("")
    for n in names:
        lines.append(
            f"{n}: corner loss {summary['corner_loss'][n]:.4f}, contrast {summary['contrast'][n]:+.4f}, "
            f"best alpha {summary['best_alpha'][n]:g}"
        )
    lines.append(f"diag (sum of corner losses) {summary['diag']:.4f}")
    if "middle" in summary:
        lines.append(f"middle (mean loss at alpha 0.5) {summary['middle']:.4f}")
    return "\n".join(lines)


def voice_sweep(model, corpus, batch_size=32, max_windows=None, device="cpu", progress=False):
    """(labels, {source name: [val loss at each setting]}) over every source's own setting and uniform mode:
    the sweep of a dial over many sources (voice.voices)."""
    settings = voices(corpus.names, model.config.geometry)
    losses = held_out_grid(model, corpus, [dial for _, dial in settings], batch_size, max_windows, device, progress,
                           "setting")
    return [label for label, _ in settings], losses


def summarize_voices(names, labels, losses):
    """The section 5 numbers of a many-source sweep: each source's loss at its own setting (corner_loss),
    its contrast (mean loss at the other sources' settings minus at its own), the setting where it is lowest,
    and the mean loss in uniform mode."""
    at = {name: dict(zip(labels, losses[name])) for name in names}
    return {
        **corners(names, at, {name: name for name in names}),
        "best_setting": {name: min(labels, key=lambda label: at[name][label]) for name in names},
        "uniform": sum(at[name][UNIFORM] for name in names) / len(names),
    }


def format_voice_table(names, labels, losses, summary):
    width = max(10, *(len(n) + 2 for n in names))
    first = max(8, *(len(label) + 1 for label in labels))
    lines = [f"{'setting':<{first}}" + "".join(f"{n:>{width}}" for n in names)]
    for i, label in enumerate(labels):
        lines.append(f"{label:<{first}}" + "".join(f"{losses[n][i]:>{width}.4f}" for n in names))
    lines.append("")
    for n in names:
        lines.append(f"{n}: own setting's loss {summary['corner_loss'][n]:.4f}, contrast {summary['contrast'][n]:+.4f}, "
                     f"lowest at {summary['best_setting'][n]}")
    lines.append(f"uniform mode (every gate open): mean loss {summary['uniform']:.4f}")
    return "\n".join(lines)
