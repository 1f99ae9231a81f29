"""One place for a generation's settings: the dial (alpha, or a mix through the calibrated map), the
sampling settings (a sampling.Sampling), the seed and the length, with their defaults, limits and checks.
sample.py, the server and the page (through /api/info) all take them from here, and make one
sampling.Generation of them.

Words: "alpha" is the raw dial; a "mix" is the share of source 1's voice a user asks for; the "dial map"
(calibrate.py) turns a mix into an alpha. The map was measured at one temperature and top-k, so a mix
keeps its meaning only at those: a mix without a temperature of its own samples at the map's, and a
different one is refused unless forced.
"""
from dataclasses import asdict, fields, replace
from typing import Optional, get_args

from abcgpt.core import limits
from abcgpt.core.errors import SettingsError
from abcgpt.measuring.dial import CALIBRATION, mix_to_alpha
from abcgpt.model.sampling import Generation, Sampling

PROMPT_BYTES = 2**20  # the largest prompt file sample.py reads: far more than any block_size of tokens
MAX_NEW_TOKENS = 100_000  # the most one sample.py generation may ask for; the server sets its own, lower
GENERATION = Generation()  # the defaults of a generation, the seed's aside
DEFAULTS = GENERATION.sampling
SEED = 1337  # sample.py's seed, and the page's first (an API request without one gets a random one)
SAMPLING = {f.name: next(iter(get_args(f.type)), f.type) for f in fields(Sampling)}  # name: int or float


def defaults() -> dict:
    """Every default of a generation: the sampling settings, its length and seed."""
    return {**asdict(DEFAULTS), "max_new_tokens": GENERATION.max_new_tokens, "seed": SEED}


def add_sampling_flags(parser, note=""):
    """A flag per sampling setting (--temperature, --top_k), none given by default; note follows each default."""
    for f in fields(Sampling):
        parser.add_argument(f"--{f.name}", type=SAMPLING[f.name], default=None,
                            help=f"{f.metadata['help']} (default: {f.default}{note})")


def sampling(given: dict, base: Sampling = DEFAULTS, prefix: str = "") -> Sampling:
    """The Sampling of the settings given (a name absent or None: not given), the others base's. Each given
    one is checked against its limit, named as the user wrote it (prefix "--" at the command line)."""
    chosen = {name: given[name] for name in SAMPLING if given.get(name) is not None}
    for name, value in chosen.items():
        limits.check(name, value, prefix + name)
    return replace(base, **chosen)


def check_unit(value: float, name: str) -> float:
    """A dial value: alpha or mix, in [0, 1]."""
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):  # False for NaN too
        raise SettingsError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def check_seed(value: int, name: str = "seed") -> int:
    return limits.check("seed", value, name)


def check_new_tokens(value: int, name: str = "max_new_tokens", least: int = 0, most: int = MAX_NEW_TOKENS) -> int:
    """A number of tokens to generate: from least to most (the server sets its own most, lower)."""
    return limits.check("max_new_tokens", value, name, limits.whole(least, most))


def calibrated_at(dial_map: dict) -> Sampling:
    """The sampling settings a dial map was measured at (maps written before they were stored: the
    settings calibrate.py has always sampled at)."""
    return Sampling(**{k: dial_map.get(k, v) for k, v in asdict(CALIBRATION).items()})


def resolve_mix(mix: float, dial_map: Optional[dict], given: dict, *, force: bool = False, prefix: str = "",
                name: str = "mix", missing: str = "mix: the checkpoint has no calibrated dial"):
    """(alpha, Sampling) for a mix: the map's alpha, sampled at the map's settings unless others are given
    (given: as for sampling()); others are refused unless force, since the mix would not hold at them."""
    check_unit(mix, name)
    if not dial_map:
        raise SettingsError(missing)
    measured = calibrated_at(dial_map)
    chosen = sampling(given, measured, prefix)
    if not force and chosen != measured:
        raise SettingsError(f"{name}: the dial was calibrated at {described(measured)}, so a mix holds only "
                            f"there, not at {described(chosen)}; leave the sampling settings out, or force them")
    return mix_to_alpha(dial_map, mix), chosen


def described(s: Sampling) -> str:
    """'temperature 1.0 and top_k None': each setting by its name."""
    return " and ".join(f"{name} {value}" for name, value in asdict(s).items())
