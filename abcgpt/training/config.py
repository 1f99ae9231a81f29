"""Training configuration, its presets, and the command-line flags made from it."""
import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from abcgpt.backends.registry import NAMES as BACKEND_NAMES
from abcgpt.backends.registry import auto_rule, check_backend
from abcgpt.core import limits
from abcgpt.core.errors import SettingsError
from abcgpt.data.corpus import DEFAULT_SOURCES, check_source_name, split_sources
from abcgpt.gates.gate import GEOMETRIES
from abcgpt.model.gpt import GPTConfig

DEFAULT_OUT_DIR = "out"  # the run folder every tool reads and train.py writes unless told otherwise

# Fields that shape the model; fixed once a run has started.
ARCHITECTURE = tuple(f.name for f in fields(GPTConfig) if f.name not in ("dropout", "vocab_size")) + ("tokenizer",)


@dataclass
class TrainConfig(GPTConfig):
    """A run's settings. The model's fields are GPTConfig's, inherited (vocab_size comes from the tokenizer)."""

    # data
    sources: list = field(default_factory=lambda: list(DEFAULT_SOURCES))  # NAME or NAME=PATH; order sets the dial
    tokenizer: str = "char"  # char or bpe (GPT-2, through tiktoken)
    val_fraction: float = 0.1
    cache_dir: str = ""  # where built-in sources are downloaded; empty: ~/.cache/abcgpt
    gate_backend: str = "auto"  # a name in abcgpt/backends/registry.py's registry, or auto; not saved with the model
    # the dial during training: one alpha per batch (the reference recipe) or per sequence
    alpha_mode: str = "batch"
    only_source: str = ""  # train on this source alone (the single-source baselines; needs gated=false)
    uniform_share: float = 0.0  # share of training dials in uniform mode (every gate 1) on the union
    dial_beta: float = 0.5  # many sources: training dials ~ Dirichlet(dial_beta, ...); 0.5 is the line's Beta at two
    # optimisation
    batch_size: int = 64
    grad_accum: int = 1
    max_iters: int = 10000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: decay over max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # evaluation, logging, checkpoints
    eval_interval: int = 500
    eval_iters: int = 100
    log_interval: int = 50
    out_dir: str = DEFAULT_OUT_DIR
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (bfloat16 on CUDA where supported, else float32), float32, bfloat16, float16
    compile: bool = False
    seed: int = 1337

    def __post_init__(self):
        if isinstance(self.sources, str):
            self.sources = split_sources(self.sources)
        self.n_sources = len(self.sources) if self.geometry != "line" else 0  # a fact of the sources, not a flag
        super().__post_init__()
        check_backend(self.gate_backend)
        checks = [
            (self.alpha_mode in ("batch", "sequence"), "alpha_mode must be 'batch' or 'sequence'"),
            (self.tokenizer in ("char", "bpe"), "tokenizer must be 'char' or 'bpe'"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype must be auto, float32, bfloat16 or float16"),
            (0.0 < self.val_fraction < 1.0, f"val_fraction must be between 0 and 1, got {self.val_fraction}"),
            (bool(str(self.out_dir).strip()), "out_dir is empty: name a folder"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
            (not (self.only_source and self.gated), "only_source trains a vanilla baseline: set gated=false"),
            (0.0 <= self.uniform_share < 1.0, f"uniform_share must be in [0, 1), got {self.uniform_share}"),
            (0.0 < self.dial_beta <= 100.0, f"dial_beta must be in (0, 100], got {self.dial_beta}"),
        ]
        for name in ("batch_size", "grad_accum", "max_iters", "warmup_iters", "lr_decay_iters", "eval_interval",
                     "eval_iters", "log_interval", "seed", "learning_rate", "min_lr", "weight_decay", "grad_clip"):
            limits.check(name, getattr(self, name))
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)
        if self.only_source:
            check_source_name(self.only_source)

    def model_config(self, vocab_size):
        """The GPTConfig of the model this run trains."""
        return GPTConfig(**{f.name: getattr(self, f.name) for f in fields(GPTConfig)} | {"vocab_size": vocab_size})

    @property
    def decay_iters(self):
        return self.lr_decay_iters or self.max_iters


PRESETS = {
    # The reference abcGPT recipe; the default on CUDA.
    "reference": dict(dropout=0.2),
    # Shows the dial within 10 minutes on 2 CPU cores; the default elsewhere. The recipe study found one
    # alpha per sequence a stronger dial with lower losses at this size (reports/recipe-study-1), and 3000
    # steps a stronger Shakespeare corner than 2000 (reports/recipe-study-2).
    "cpu": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32, dropout=0.0, alpha_mode="sequence",
        max_iters=3000, learning_rate=2e-3, min_lr=2e-4, warmup_iters=50,
        eval_interval=500, eval_iters=20, log_interval=100,
    ),
}


def default_preset(cuda_available):
    return "reference" if cuda_available else "cpu"


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# One line of --help per flag: what it sets. Allowed values come from CHOICES; defaults from the presets.
FLAG_HELP = {
    "sources": "comma-separated NAME or NAME=PATH (a comma in a path: \\,); the first sits at alpha 0, the last at "
               "alpha 1",
    "tokenizer": "characters of the sources, or GPT-2's byte-pair encoding (through tiktoken)",
    "val_fraction": "share of each source held out for validation (its last part)",
    "cache_dir": "where built-in sources are downloaded (empty: ~/.cache/abcgpt)",
    "gate_backend": f"how gated layers run; {auto_rule()}",
    "alpha_mode": "one alpha (and source) per batch, or one per sequence",
    "only_source": "train on this source alone (a single-source baseline; needs --gated false)",
    "block_size": "context length in tokens",
    "n_layer": "transformer blocks",
    "n_head": "attention heads per block (must divide n_embd)",
    "n_embd": "width of the residual stream",
    "dropout": "dropout probability in [0, 1)",
    "bias": "biases in the Linear and LayerNorm layers",
    "gated": "give units scores and the dial; false: nanoGPT's GPT (the vanilla baseline)",
    "narrowness": "w in the tent gate: below 1 each unit fires over a narrower range of alpha",
    "mask_seed": "seeds the specialty scores",
    "score_beta": "scores ~ Beta(a, a) for this a: below 1 mostly specialists, above 1 mostly halfsies",
    "sort_units": "relabel units in score order at init, so silent units form one block (function unchanged)",
    "geometry": "where units sit: line (sources evenly on one alpha), or for many sources pool (shared units and "
                "one source per other unit), simplex or tent (units at Dirichlet points); docs/design.md, section 8",
    "shared": "pool geometry: share of units on at every setting",
    "uniform_share": "share of training dials in uniform mode (every gate 1, a source drawn uniformly)",
    "dial_beta": "many sources: training dials ~ Dirichlet(dial_beta, ...); below 0.5 nearer the sources' vertices",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step (a multiple of the number of processes)",
    "max_iters": "optimizer steps to train for (the run's end)",
    "learning_rate": "peak learning rate, after warm-up",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_iters": "steps of linear warm-up",
    "lr_decay_iters": "step where the cosine decay ends; 0: at max_iters. Extend a finished run's schedule by "
                      "giving it with --resume",
    "weight_decay": "AdamW weight decay (matrices and embeddings only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this; 0: no clipping",
    "eval_interval": "steps between held-out evaluations (each writes ckpt.pt)",
    "eval_iters": "held-out batches per evaluation (eval_iters * batch_size windows per source)",
    "log_interval": "steps between log lines",
    "out_dir": "folder for ckpt.pt, best.pt and log.jsonl",
    "device": "auto (CUDA if there is one), cpu, cuda or cuda:N",
    "dtype": "auto: bfloat16 on CUDA where supported, else float32",
    "compile": "torch.compile the model",
    "seed": "seeds weights, batches and dropout (0 to 2**63 - 1)",
}
CHOICES = {"tokenizer": ("char", "bpe"), "alpha_mode": ("batch", "sequence"), "gate_backend": BACKEND_NAMES,
           "geometry": GEOMETRIES,
           "dtype": ("auto", "float32", "bfloat16", "float16")}


def add_config_flags(parser):
    """One --flag per TrainConfig field; a flag left out stays absent from the parsed namespace."""
    for f in fields(TrainConfig):
        if f.name in ("vocab_size", "n_sources"):  # set by the tokenizer and the sources
            continue
        field_default = f.default_factory() if f.default is MISSING else f.default
        kind = type(field_default)
        values = {name: preset.get(f.name, field_default) for name, preset in PRESETS.items()}
        shown = lambda v: (",".join(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool)
                           else "none" if v == "" else v)
        default = (f"default {shown(values['reference'])}" if len(set(map(repr, values.values()))) == 1 else
                   ", ".join(f"{name} preset {shown(v)}" for name, v in values.items()))
        if f.name in CHOICES:
            metavar = "|".join(CHOICES[f.name])
        elif kind is bool:
            metavar = "true|false"
        else:
            metavar = {"sources": "A,B", "out_dir": "DIR", "cache_dir": "DIR"}.get(f.name, kind.__name__.upper())
        parser.add_argument(f"--{f.name}", type=_parse_bool if kind is bool else str if kind is list else kind,
                            choices=CHOICES.get(f.name), default=argparse.SUPPRESS, metavar=metavar,
                            help=f"{FLAG_HELP[f.name]} ({default})")


def baseline_config(config, source, tokens, out_dir):
    """A vanilla GPT trained on one source alone, on as many of its tokens as the gated run saw
    (docs/design.md, section 5: the cost of the dial), into out_dir. Same shape and optimiser; its own
    schedule."""
    tokens_per_step = config.batch_size * config.block_size * config.grad_accum
    return replace(
        config, gated=False, only_source=source, lr_decay_iters=0,
        max_iters=max(1, math.ceil(tokens / tokens_per_step)),
        out_dir=str(out_dir),
    )


def build_config(preset, overrides, base=None):
    """A TrainConfig: the preset (or a resumed run's config as base) with explicit overrides on top."""
    values = dict(base) if base is not None else {**asdict(TrainConfig()), **PRESETS[preset]}
    values.update(overrides)
    return TrainConfig.from_dict(values)
