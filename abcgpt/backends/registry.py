"""The gate backends, in one registry: how a forward's gated layers run, and which executor a forward gets
(executor_for; docs/design.md, section 2).

Each backend is a module with its executor and a Backend declaring its name, the
devices "auto" may choose it on, whether it takes one alpha per sequence, and its
auto priority: reference (executors.py, the oracle, any alpha), folded (folded.py,
one alpha, gates folded into the weights) and triton (fused.py, the fused kernel).
Adding one is a module and a line in REGISTRY.
"""
import torch

from abcgpt.core.errors import SettingsError
from abcgpt.gates.voice import prepare

from .executors import REFERENCE, Backend, Ungated
from .folded import FOLDED
from .fused import TRITON

REGISTRY = {b.name: b for b in (FOLDED, TRITON, REFERENCE)}
Executor = Ungated  # every executor's base class: the type a forward hands its gated layers to
NAMES = ("auto", *REGISTRY)


def check_backend(name: str) -> str:
    if name not in NAMES:
        raise SettingsError(f"gate_backend must be one of {NAMES}, got {name!r}")
    return name


def auto_rule() -> str:
    """The auto rule in words, from the registry."""
    ranked = sorted(REGISTRY.values(), key=lambda b: -b.auto_priority)
    return "auto: the first of " + ", ".join(
        b.name + ("" if b.per_row else " (one alpha)") + ("" if "cpu" in b.devices else f" (on {'/'.join(b.devices)})")
        for b in ranked) + " that serves the device and the alphas"


def choose(name: str, device: torch.device, per_row: bool) -> Backend:
    """The backend a forward on device runs with, for one alpha or one per sequence (per_row)."""
    if name == "auto":
        fits = [b for b in REGISTRY.values() if (b.per_row or not per_row) and device.type in b.devices
                and b.unavailable(device) is None]
        return max(fits, key=lambda b: b.auto_priority)
    backend = REGISTRY[check_backend(name)]
    if per_row and not backend.per_row:
        raise SettingsError(f"gate_backend={name!r} takes one alpha per batch; per-sequence alphas need one of "
                            f"{', '.join(b.name for b in REGISTRY.values() if b.per_row)} or 'auto'")
    reason = backend.unavailable(device)
    if reason:
        raise SettingsError(reason)
    return backend


def explain(name: str, device: torch.device, per_row: bool) -> str:
    """The backend chosen, with why where "auto" passed over one of higher priority (for the trainer's log)."""
    chosen = choose(name, device, per_row)
    if name != "auto":
        return chosen.name
    passed = [b.name for b in REGISTRY.values()
              if b.auto_priority > chosen.auto_priority and (b.per_row or not per_row)]
    return chosen.name + (f" (auto; {', '.join(passed)} cannot run on {device.type})" if passed else "")


def available(device: torch.device) -> list:
    """The backends made for device's type that can run there (Triton's CPU interpreter does not count)."""
    return [b.name for b in REGISTRY.values() if device.type in b.devices and b.unavailable(device) is None]


def executor_for(model, alpha, batch_size: int, device: torch.device) -> Executor:
    """What runs the gated layers of model's forward at the dial (a voice.Dial, or on the line an alpha or one
    per sequence), with its gates computed once, on the backend the registry picks."""
    if not model.config.gated:
        if alpha is not None:
            raise ValueError("this model is not gated (gated=False): call it without alpha")
        return ungated()
    dial = prepare(alpha, model.config.geometry, batch_size, model.config.n_sources)
    host_dial = dial if dial.on_host else None
    dial = dial.to(device, non_blocking=True)
    backend = choose(model.backend, device, per_row=dial.per_row)
    return backend.build(model, model.gates(dial), host_dial)


def ungated() -> Executor:
    """The executor of a vanilla model (gated=False)."""
    return Ungated()
