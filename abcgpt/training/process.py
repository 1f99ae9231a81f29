"""Where a training process runs: its device and, under torchrun (DDP), its place among the others."""
import os
from dataclasses import dataclass

import torch
from torch.distributed import destroy_process_group, init_process_group

from abcgpt.core.device import resolve_device
from abcgpt.core.errors import SettingsError


@dataclass
class Process:
    device: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    micro_steps: int = 1  # this process's share of the step's grad_accum micro-batches
    ddp: bool = False

    @property
    def device_type(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "cpu"

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str, grad_accum: int) -> "Process":
        """This process: alone, or one of torchrun's (RANK set), with its process group started."""
        if int(os.environ.get("RANK", -1)) == -1:
            return cls(resolve_device(device), micro_steps=grad_accum)
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        use_cuda = resolve_device(device).startswith("cuda")
        init_process_group(backend="nccl" if use_cuda else "gloo")
        process = cls(f"cuda:{local_rank}" if use_cuda else "cpu", rank, local_rank, world_size, ddp=True)
        if use_cuda:
            torch.cuda.set_device(process.device)
        if grad_accum % world_size:
            raise SettingsError(f"grad_accum ({grad_accum}) must be a multiple of the number of processes "
                                f"({world_size})")
        process.micro_steps = grad_accum // world_size
        return process

    def total(self, values: list) -> list:
        """The sum of each value over all processes (every process must call this)."""
        counts = torch.tensor(values, dtype=torch.long, device=self.device)
        if self.ddp:
            torch.distributed.all_reduce(counts)
        return counts.tolist()

    def anyone(self, flag: bool) -> bool:
        """Whether flag holds on any process (every process must call this)."""
        if not self.ddp:
            return flag
        value = torch.tensor(int(flag), device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        if self.ddp:
            # every process done with every collective before any tears its group down: without this, a
            # process leaving first could abort the other inside gloo ("terminate called ...")
            torch.distributed.barrier()
            destroy_process_group()
