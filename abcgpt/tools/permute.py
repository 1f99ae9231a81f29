"""Sort an existing checkpoint's units by score: a permutation that leaves the model's function unchanged.

    python -m abcgpt.tools.permute in.pt out.pt          # a new file; optimizer state too, so training can resume on it
    python -m abcgpt.tools.permute in.pt --in_place      # rewrite in.pt itself

New models are sorted at init (GPTConfig.sort_units); this is for checkpoints made before.
The map of which rows and columns move with each unit is units.py's.
"""
from pathlib import Path

from abcgpt.core.checkpoint import CheckpointError
from abcgpt.core.errors import SettingsError
from abcgpt.core.outputs import check_output
from abcgpt.gates.units import sort_units
from abcgpt.training.run import RunFolder, editing, load_model

from .cli import HelpFormatter, Parser, run_tool, user_errors


def sorted_run(path):
    """The run at path with its units sorted by score, and its optimizer's moments with them."""
    model, _, run = load_model(path)
    if not model.config.gated:
        raise CheckpointError(f"{path} holds a vanilla model: there are no scores to sort by")
    run.optimizer = sort_units(model, run.optimizer)
    run.model = model.state_dict()
    run.model_config.sort_units = True
    return run


@user_errors
def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("source", help="checkpoint to read")
    p.add_argument("dest", nargs="?", help="checkpoint to write, with units sorted: a new file")
    p.add_argument("--in_place", action="store_true", help="rewrite source itself instead of writing dest")
    args = p.parse_args(argv)
    if (args.dest is None) == (not args.in_place):
        raise SettingsError("give dest, a new file to write, or --in_place to rewrite source itself")
    dest = Path(args.source if args.in_place else args.dest)
    if not args.in_place:  # a new path: nothing the user did not name is written over
        check_output(dest, "dest", "a new path", lambda _: False)
    if args.in_place:
        with editing(dest) as save:  # locked before it is read
            save(sorted_run(args.source))
    else:
        with RunFolder.of(dest).lock():
            sorted_run(args.source).save(dest)
    print(f"wrote {dest} with units sorted by score")


def command():
    """python -m abcgpt.tools.permute and the console script abcgpt-permute."""
    run_tool(main)


if __name__ == "__main__":
    command()
