"""Relabel units in score order: a permutation that leaves the model's function unchanged.

Residual channels, attention heads and MLP hidden units are reordered so that
their scores ascend. Then, at any alpha, each group's active units (nonzero gate)
are one contiguous block, which the folded backend slices out of the matmuls.

    python -m abcgpt.permute in.pt out.pt   # sort an existing checkpoint (optimizer state too)
"""
import argparse
import sys

import torch


def _unit_rows(order, size):
    """Row indices that move whole blocks of `size` rows (one block per unit) in `order`."""
    return (order[:, None] * size + torch.arange(size)).flatten()


def unit_orders(model):
    """The permutation of each group of units that sorts it by score."""
    blocks = model.transformer.h
    return {
        "embd": torch.argsort(model.embd_scores.cpu(), stable=True),
        "heads": [torch.argsort(b.attn.head_scores.cpu(), stable=True) for b in blocks],
        "hidden": [torch.argsort(b.mlp.hidden_scores.cpu(), stable=True) for b in blocks],
    }


def _moves(model, orders):
    """(tensor name, [(dim, index), ...]) for every parameter and score buffer touched."""
    c = model.config
    e = orders["embd"]
    moves = {
        "embd_scores": [(0, e)],
        "transformer.wte.weight": [(1, e)],  # tied with lm_head.weight
        "transformer.wpe.weight": [(1, e)],
        "transformer.ln_f.weight": [(0, e)],
        "transformer.ln_f.bias": [(0, e)],
    }
    hs = c.n_embd // c.n_head
    for i, (heads, hidden) in enumerate(zip(orders["heads"], orders["hidden"])):
        p = f"transformer.h.{i}."
        head_cols = _unit_rows(heads, hs)
        qkv_rows = torch.cat([part * c.n_embd + head_cols for part in range(3)])
        moves.update({
            p + "ln_1.weight": [(0, e)], p + "ln_1.bias": [(0, e)],
            p + "ln_2.weight": [(0, e)], p + "ln_2.bias": [(0, e)],
            p + "attn.head_scores": [(0, heads)],
            p + "attn.c_attn.weight": [(0, qkv_rows), (1, e)], p + "attn.c_attn.bias": [(0, qkv_rows)],
            p + "attn.c_proj.weight": [(0, e), (1, head_cols)], p + "attn.c_proj.bias": [(0, e)],
            p + "mlp.hidden_scores": [(0, hidden)],
            p + "mlp.c_fc.weight": [(0, hidden), (1, e)], p + "mlp.c_fc.bias": [(0, hidden)],
            p + "mlp.c_proj.weight": [(0, e), (1, hidden)], p + "mlp.c_proj.bias": [(0, e)],
        })
    return moves


def _permuted(t, moves):
    for dim, index in moves:
        t = t.index_select(dim, index.to(t.device))
    return t


@torch.no_grad()
def sort_units(model, optimizer_state=None):
    """Reorder a gated model's units by ascending score, in place.

    optimizer_state, an AdamW state_dict from model.configure_optimizers, is
    permuted alike (and returned), so training can resume on the sorted model.
    """
    if not model.config.gated:
        raise ValueError("a vanilla model has no scores to sort by")
    moves = _moves(model, unit_orders(model))
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name, t in tensors.items():
        if name in moves:
            t.copy_(_permuted(t, moves[name]))
    if optimizer_state is not None:
        for index, name in enumerate(model.optimizer_param_names()):
            state = optimizer_state["state"].get(index, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and name in moves:
                    state[key] = _permuted(state[key], moves[name])
    return optimizer_state


def main(argv=None):
    from .checkpoint import CheckpointError, load_model, save_checkpoint

    p = argparse.ArgumentParser(description="Sort a checkpoint's units by score (function unchanged).")
    p.add_argument("source")
    p.add_argument("dest")
    args = p.parse_args(argv)
    try:
        model, _, state = load_model(args.source)
        if not model.config.gated:
            raise CheckpointError(f"{args.source} holds a vanilla model: there are no scores to sort by")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    state["optimizer"] = sort_units(model, state.get("optimizer"))
    state["model"] = model.state_dict()
    state["model_config"] = {**state["model_config"], "sort_units": True}
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, args.dest)
    print(f"wrote {args.dest} with units sorted by score")


if __name__ == "__main__":
    main()
