"""Sweep the dial over alpha = 0, 0.1, ..., 1 on each source's held-out val split (on a dial over many
sources: every source's own setting and uniform mode).

    python evaluate.py --ckpt out/ckpt.pt                # the sources the run trained on
    python evaluate.py --ckpt out/ckpt.pt --sources tinystories=a.txt,tinyshakespeare=b.txt

Prints the loss table with corner losses, contrast, middle and best alpha per
source, and writes them as JSON (default: eval.json beside the checkpoint).
"""

from abcgpt.core import limits
from abcgpt.core.atomic import write_json
from abcgpt.core.errors import SettingsError
from abcgpt.core.outputs import check_out_file, is_json_object, resolved
from abcgpt.core.preflight import check_memory, forward_bytes
from abcgpt.measuring.loss import (
    SWEEP, format_table, format_voice_table, summarize, summarize_voices, sweep, voice_sweep,
)
from abcgpt.training.run import DEFAULT_CHECKPOINT, RunFolder, load_gated_run

from .cli import (
    HelpFormatter, Parser, add_runtime_flags, add_source_flags, apply_runtime_flags, check_max_windows, run_tool,
    user_errors,
)


@user_errors
def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_CHECKPOINT, help="checkpoint written by train.py")
    add_source_flags(p)
    p.add_argument("--batch_size", type=int, default=32, help="val windows per forward")
    p.add_argument("--max_windows", type=int, default=None, help="score at most this many val windows per source")
    p.add_argument("--out", default=None, help="the JSON file this writes (default: eval.json beside the checkpoint)")
    add_runtime_flags(p)
    args = p.parse_args(argv)
    apply_runtime_flags(args)
    limits.check("eval_batch_size", args.batch_size, "--batch_size")
    check_max_windows(args.max_windows)
    out = check_out_file(args.out or RunFolder.of(args.ckpt).evaluation, "--out", "an evaluation",
                         lambda path: is_json_object(path, "checkpoint", "losses", "sources"))
    if resolved(out, "--out") == resolved(args.ckpt, "--ckpt"):
        raise SettingsError(f"--out: {out} is the checkpoint itself; refusing to write over it")
    model, tokenizer, run, corpus = load_gated_run(args.ckpt, args.device, args.sources, args.cache_dir)
    check_memory(forward_bytes(model.config, args.batch_size), args.device, f"--batch_size {args.batch_size:,}")

    if model.config.geometry == "line":
        alphas, losses = sweep(model, corpus, SWEEP, args.batch_size, args.max_windows, args.device, progress=True)
        summary = summarize(corpus.names, alphas, losses)
        print(format_table(corpus.names, alphas, losses, summary))
        grid = {"alphas": alphas}
    else:
        labels, losses = voice_sweep(model, corpus, args.batch_size, args.max_windows, args.device, progress=True)
        summary = summarize_voices(corpus.names, labels, losses)
        print(format_voice_table(corpus.names, labels, losses, summary))
        grid = {"geometry": model.config.geometry, "settings": labels}
    result = {
        "checkpoint": str(args.ckpt), "weights_sha256": run.weights_sha256, "max_windows": args.max_windows,
        "step": run.step, "sources": corpus.names,
        "val_tokens": {n: len(v) for n, v in zip(corpus.names, corpus.val)},
        **grid, "losses": losses, **summary,
    }
    write_json(out, result)
    print(f"wrote {out}")


def command():
    """python evaluate.py, python -m abcgpt.tools.evaluate and the console script abcgpt-evaluate."""
    run_tool(main)


if __name__ == "__main__":
    command()
