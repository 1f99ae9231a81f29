"""DDP under torchrun on the CPU (gloo) against one process with the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from abcgpt.core.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_match_one(corpus_files, tmp_path):
    stories, plays = corpus_files
    args = ["--sources", f"stories={stories},plays={plays}", "--n_layer", "1", "--n_head", "2", "--n_embd", "16",
            "--block_size", "8", "--batch_size", "4", "--grad_accum", "2", "--max_iters", "3", "--dropout", "0.1",
            "--eval_iters", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "train.py", *args, "--out_dir", str(tmp_path / "one")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *args, "--out_dir", str(tmp_path / "two")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    single, ddp = load_checkpoint(tmp_path / "one" / "ckpt.pt"), load_checkpoint(tmp_path / "two" / "ckpt.pt")
    assert single["step"] == ddp["step"] == 3
    for name, p in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    for s, d in zip(single["optimizer"]["state"].values(), ddp["optimizer"]["state"].values()):
        torch.testing.assert_close(d["exp_avg"], s["exp_avg"], rtol=1e-4, atol=1e-7)
