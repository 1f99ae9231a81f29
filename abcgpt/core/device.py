"""Which device to run on: the one place that decides "CUDA if there is one"."""
import torch

from .errors import SettingsError


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name="auto"):
    """'auto' becomes the default device; a CUDA device asked for where there is none is refused."""
    if name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingsError(f"device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise SettingsError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return name
