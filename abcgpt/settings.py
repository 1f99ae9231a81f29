"""One place for a generation's settings: the dial (alpha, or a mix through the calibrated map) and the
sampling settings, with their defaults, limits and checks. sample.py, the server and the page (through
/api/info) all take them from here.

Words: "alpha" is the raw dial; a "mix" is the share of source 1's voice a user asks for; the "dial map"
(calibrate.py) turns a mix into an alpha. The map was measured at one temperature and top-k, so a mix
keeps its meaning only at those: a mix without a temperature of its own samples at the map's, and a
different one is refused unless forced.
"""
from dataclasses import asdict, dataclass
from typing import Optional

from . import limits
from .dial import CALIBRATION, mix_to_alpha
from .errors import SettingsError

PROMPT_BYTES = 2**20  # the largest prompt file sample.py reads: far more than any block_size of tokens
MAX_NEW_TOKENS = 100_000  # the most one sample.py generation may ask for; the server sets its own, lower


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: the defaults here are every front door's."""

    temperature: float = 0.8
    top_k: Optional[int] = 200
    max_new_tokens: int = 300


DEFAULTS = Sampling()


def defaults() -> dict:
    return asdict(DEFAULTS)


def check_unit(value: float, name: str) -> float:
    """A dial value: alpha or mix, in [0, 1]."""
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):  # False for NaN too
        raise SettingsError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def check_temperature(value: float, name: str = "temperature") -> float:
    return float(limits.check("temperature", value, name))


def check_top_k(value: Optional[int], name: str = "top_k") -> Optional[int]:
    return value if value is None else limits.check("top_k", value, name)


def check_seed(value: int, name: str = "seed") -> int:
    return limits.check("seed", value, name)


def check_new_tokens(value: int, name: str = "max_new_tokens", least: int = 0, most: int = MAX_NEW_TOKENS) -> int:
    """A number of tokens to generate: from least to most (the server sets its own most, lower)."""
    return limits.check("max_new_tokens", value, name, limits.whole(least, most))


def or_defaults(temperature: Optional[float], top_k: Optional[int]) -> tuple:
    """(temperature, top_k) for a dial given as alpha: those given, the defaults for those not."""
    return (DEFAULTS.temperature if temperature is None else temperature,
            DEFAULTS.top_k if top_k is None else top_k)


def calibrated_at(dial_map: dict) -> dict:
    """The temperature and top-k a dial map was measured at (maps written before they were stored: the
    settings calibrate.py has always sampled at)."""
    return {k: dial_map.get(k, v) for k, v in CALIBRATION.items()}


def resolve_mix(mix: float, dial_map: Optional[dict], temperature: Optional[float], top_k: Optional[int], *,
                force: bool = False, name: str = "mix", missing: str = "mix: the checkpoint has no calibrated dial"):
    """(alpha, temperature, top_k) for a mix: the map's alpha, sampled at the map's temperature and top-k
    unless others are given; others are refused unless force, since the mix would not hold at them."""
    check_unit(mix, name)
    if not dial_map:
        raise SettingsError(missing)
    measured = calibrated_at(dial_map)
    temperature = measured["temperature"] if temperature is None else temperature
    top_k = measured["top_k"] if top_k is None else top_k
    if not force and (temperature, top_k) != (measured["temperature"], measured["top_k"]):
        raise SettingsError(f"{name}: the dial was calibrated at temperature {measured['temperature']} and top-k "
                            f"{measured['top_k']}, so a mix holds only there, not at temperature {temperature} and "
                            f"top-k {top_k}; leave temperature and top-k out, or force them")
    return mix_to_alpha(dial_map, mix), temperature, top_k
