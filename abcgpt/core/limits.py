"""Every number a user gives, with its one range. The command line, the server and the configs all check
against this table, so a number out of range is one line naming its range, never an overflow deep inside
torch. The ranges are wide: they only keep out what cannot mean anything here."""
import math
from dataclasses import dataclass

from .errors import SettingsError

SEED_LIMIT = 2**63  # seeds are 64-bit, as torch takes them
BILLION = 10**9


@dataclass(frozen=True)
class Limit:
    low: float
    high: float
    low_open: bool = False  # low itself is out (a temperature must be above 0)
    integer: bool = False

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low_open:
            return f"{kind} above {_show(self.low)} and at most {_show(self.high)}"
        return f"{kind} from {_show(self.low)} to {_show(self.high)}"


def _show(value):
    return "2**63 - 1" if value == SEED_LIMIT - 1 else f"{value:,}" if isinstance(value, int) else f"{value:g}"


def whole(low, high):
    return Limit(low, high, integer=True)


LIMITS = {
    # generation: sample.py, calibrate.py, report.py and the server
    "temperature": Limit(0, 100, low_open=True),  # past 100 every token is about as likely: more only overflows
    "top_k": whole(1, 2**20),  # more than any vocabulary: the same as all tokens
    "seed": whole(0, SEED_LIMIT - 1),
    "samples": whole(1, 100_000),
    "grid": whole(2, 10_001),
    "max_windows": whole(1, BILLION),
    "eval_batch_size": whole(1, 2**20),
    # how a tool runs
    "threads": whole(1, 4096),
    "port": whole(0, 65535),
    "max_batch": whole(1, 2**16),
    "max_queue": whole(1, 10**6),
    "max_per_client": whole(1, 2**16),
    "max_queued_per_client": whole(1, 10**6),
    "max_connections": whole(1, 10**6),
    "timeout": Limit(0, 86_400, low_open=True),  # seconds: up to a day
    # the model
    "block_size": whole(1, 2**20),
    "vocab_size": whole(1, 2**24),
    "n_layer": whole(1, 1024),
    "n_head": whole(1, 4096),
    "n_embd": whole(1, 2**16),
    "mask_seed": whole(0, SEED_LIMIT - 1),
    "narrowness": Limit(0, 100, low_open=True),
    "score_beta": Limit(0, 1000, low_open=True),
    # training
    "batch_size": whole(1, 2**20),
    "grad_accum": whole(1, 2**20),
    "max_iters": whole(0, BILLION),
    "warmup_iters": whole(0, BILLION),
    "lr_decay_iters": whole(0, BILLION),
    "eval_interval": whole(1, BILLION),
    "eval_iters": whole(1, BILLION),
    "log_interval": whole(1, BILLION),
    "learning_rate": Limit(0, 10, low_open=True),
    "min_lr": Limit(0, 10),
    "weight_decay": Limit(0, 1000),
    "grad_clip": Limit(0, 10**6),
}


def check(name, value, flag=None, limit=None):
    """value, refused in one line naming its range unless it is within LIMITS[name] (or limit)."""
    limit = limit or LIMITS[name]
    if not limit.holds(value):
        raise SettingsError(f"{flag or name} must be {limit.describe()}, got {value}")
    return value
