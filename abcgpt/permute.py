"""Sort an existing checkpoint's units by score: a permutation that leaves the model's function unchanged.

    python -m abcgpt.permute in.pt out.pt   # optimizer state too, so training can resume on it

New models are sorted at init (GPTConfig.sort_units); this is for checkpoints made before.
The map of which rows and columns move with each unit is units.py's.
"""
import sys

from .checkpoint import CheckpointError
from .cli import HelpFormatter, Parser
from .errors import UserError
from .run import load_model
from .units import sort_units


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("source", help="checkpoint to read")
    p.add_argument("dest", help="checkpoint to write, with units sorted")
    args = p.parse_args(argv)
    try:
        model, _, run = load_model(args.source)
        if not model.config.gated:
            raise CheckpointError(f"{args.source} holds a vanilla model: there are no scores to sort by")
        run.optimizer = sort_units(model, run.optimizer)
    except UserError as e:
        sys.exit(f"error: {e}")
    run.model = model.state_dict()
    run.model_config.sort_units = True
    run.save(args.dest)
    print(f"wrote {args.dest} with units sorted by score")


if __name__ == "__main__":
    main()
