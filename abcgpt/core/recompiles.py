"""The one way this project proves code compiles once: inside forbid_recompiles(), a torch.compile'd
function that would compile again raises a RuntimeError instead of silently running new code.

torch.compiler.set_stance("fail_on_recompile") exists from torch 2.6 on and really raises. The older
torch._dynamo.config.error_on_recompile is gone from torch 2.13, where setting it changes nothing.
"""
import torch


def forbid_recompiles():
    """A context manager: compiled functions may run only code they already compiled."""
    return torch.compiler.set_stance("fail_on_recompile")
