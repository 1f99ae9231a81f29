"""Training configuration, its presets, and the command-line flags made from it."""
import argparse
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .backends import check_backend
from .data import DEFAULT_SOURCES
from .model import GPTConfig

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
    gate_backend: str = "auto"  # auto, reference, folded or triton (abcgpt/backends.py); not saved with the model
    # the dial during training: one alpha per batch (the reference recipe) or per sequence
    alpha_mode: str = "batch"
    only_source: str = ""  # train on this source alone (the single-source baselines; needs gated=false)
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
    out_dir: str = "out"
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto (bfloat16 on CUDA where supported, else float32), float32, bfloat16, float16
    compile: bool = False
    seed: int = 1337

    def __post_init__(self):
        super().__post_init__()
        check_backend(self.gate_backend)
        if isinstance(self.sources, str):
            self.sources = [s for s in self.sources.split(",") if s.strip()]
        checks = [
            (self.alpha_mode in ("batch", "sequence"), "alpha_mode must be 'batch' or 'sequence'"),
            (self.tokenizer in ("char", "bpe"), "tokenizer must be 'char' or 'bpe'"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype must be auto, float32, bfloat16 or float16"),
            (self.batch_size > 0 and self.grad_accum > 0, "batch_size and grad_accum must be positive"),
            (self.max_iters >= 0 and self.warmup_iters >= 0, "max_iters and warmup_iters must not be negative"),
            (self.eval_interval > 0 and self.eval_iters > 0 and self.log_interval > 0, "intervals must be positive"),
            (not (self.only_source and self.gated), "only_source trains a vanilla baseline: set gated=false"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def model_config(self, vocab_size):
        """The GPTConfig of the model this run trains."""
        return GPTConfig(**{f.name: getattr(self, f.name) for f in fields(GPTConfig)} | {"vocab_size": vocab_size})

    @property
    def decay_iters(self):
        return self.lr_decay_iters or self.max_iters


PRESETS = {
    # The reference abcGPT recipe; the default on CUDA.
    "reference": dict(dropout=0.2),
    # Shows the dial within 10 minutes on 2 CPU cores; the default elsewhere.
    "cpu": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32, dropout=0.0,
        max_iters=2000, learning_rate=2e-3, min_lr=2e-4, warmup_iters=50,
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


def add_config_flags(parser):
    """One --flag per TrainConfig field; a flag left out stays absent from the parsed namespace."""
    for f in fields(TrainConfig):
        if f.name == "vocab_size":  # set by the tokenizer
            continue
        if f.name == "sources":
            parser.add_argument("--sources", default=argparse.SUPPRESS, metavar="A,B",
                                help="comma-separated NAME or NAME=PATH, alpha 0 first (default: tinystories,tinyshakespeare)")
            continue
        kind = type(f.default)
        defaults = ", ".join(f"{name} {values.get(f.name, f.default)!r}" for name, values in PRESETS.items())
        parser.add_argument(f"--{f.name}", type=_parse_bool if kind is bool else kind,
                            default=argparse.SUPPRESS, metavar=kind.__name__.upper(), help=f"presets: {defaults}")


def baseline_config(config, source, tokens):
    """A vanilla GPT trained on one source alone, on as many of its tokens as the gated run saw
    (docs/design.md, section 5: the cost of the dial). Same shape and optimiser; its own schedule."""
    tokens_per_step = config.batch_size * config.block_size * config.grad_accum
    return replace(
        config, gated=False, only_source=source, lr_decay_iters=0,
        max_iters=max(1, math.ceil(tokens / tokens_per_step)),
        out_dir=str(Path(config.out_dir) / f"baseline-{source}"),
    )


def build_config(preset, overrides, base=None):
    """A TrainConfig: the preset (or a resumed run's config as base) with explicit overrides on top."""
    values = dict(base) if base is not None else {**asdict(TrainConfig()), **PRESETS[preset]}
    values.update(overrides)
    return TrainConfig.from_dict(values)
