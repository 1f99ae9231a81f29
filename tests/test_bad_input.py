"""Bad input at the command line: a one-line error, a non-zero exit, and no existing file changed.

Each case calls a tool's main() as the command line would, in a workspace holding a
trained run, corpora and damaged files, and checks the message, that nothing went
to a traceback, and that no file in the workspace changed or appeared. The bad-input
table of docs/bad-input.md is made from CASES:

    python tests/test_bad_input.py --write     # refresh the table in docs/bad-input.md
"""
import fcntl
import hashlib
import importlib
import pickle
import shutil
import sys
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from abcgpt.core.tables import with_table

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "bad-input.md"  # where the table of CASES lives

Case = namedtuple("Case", "what tool args message env", defaults=(None,))
TOOLS = {name: f"abcgpt.tools.{name}"
         for name in ("train", "sample", "evaluate", "report", "calibrate", "serve", "permute", "inspect")}
TINY = ("--sources stories={ws}/stories.txt,plays={ws}/plays.txt --n_layer 1 --n_head 2 --n_embd 16 --block_size 8 "
        "--batch_size 4 --max_iters 2 --eval_interval 2 --eval_iters 1 --log_interval 1 --out_dir {ws}/fresh "
        "--device cpu ")
CKPT = "--ckpt {ws}/run/ckpt.pt "
VOICES = "--ckpt {ws}/voices/ckpt.pt "  # three sources on the pool dial

CASES = [
    # sample.py: the dial, the prompt, the numbers
    Case("an alpha that is not a number", "sample", CKPT + "--alpha high", "--alpha: 'high' is not a number"),
    Case("an empty alpha in a list", "sample", CKPT + "--alpha 0.5,,1", "--alpha: '' is not a number"),
    Case("an alpha above 1", "sample", CKPT + "--alpha 1.5", "--alpha must be in [0, 1], got 1.5"),
    Case("an alpha below 0", "sample", CKPT + "--alpha -0.2", "--alpha must be in [0, 1], got -0.2"),
    Case("a NaN alpha in a list", "sample", CKPT + "--alpha 0.5,nan", "--alpha must be in [0, 1], got nan"),
    Case("an infinite alpha", "sample", CKPT + "--alpha inf", "--alpha must be in [0, 1], got inf"),
    Case("a prompt with characters the vocabulary lacks", "sample", CKPT + "--start one_Q_day_€",
         "--start: the prompt has 3 character(s) not in the vocabulary: 'Q', '_', '€'"),
    Case("an empty prompt", "sample", CKPT + "--start=", "--start: the prompt is empty"),
    Case("a prompt file that does not exist", "sample", CKPT + "--start FILE:{ws}/no/prompt.txt",
         "--start: cannot read prompt file {ws}/no/prompt.txt"),
    Case("a prompt file that is a folder", "sample", CKPT + "--start FILE:{ws}/folder",
         "--start: cannot read prompt file {ws}/folder"),
    Case("a prompt file that is not UTF-8", "sample", CKPT + "--start FILE:{ws}/latin1.txt",
         "--start: cannot read prompt file {ws}/latin1.txt"),
    Case("a zero temperature", "sample", CKPT + "--temperature 0", "--temperature must be a number above 0 and at most 100, got 0.0"),
    Case("a negative temperature", "sample", CKPT + "--temperature -1",
         "--temperature must be a number above 0 and at most 100, got -1.0"),
    Case("a NaN temperature", "sample", CKPT + "--temperature nan", "--temperature must be a number above 0 and at most 100, got nan"),
    Case("an infinite temperature", "sample", CKPT + "--temperature inf",
         "--temperature must be a number above 0 and at most 100, got inf"),
    Case("a temperature that is not a number", "sample", CKPT + "--temperature warm",
         "argument --temperature: invalid float value: 'warm'"),
    Case("top-k of 0", "sample", CKPT + "--top_k 0", "--top_k must be an integer from 1 to 1,048,576, got 0"),
    Case("top-k that is not a number", "sample", CKPT + "--top_k many", "argument --top_k: invalid int value: 'many'"),
    Case("zero samples", "sample", CKPT + "--num_samples 0", "--samples must be an integer from 1 to 100,000, got 0"),
    Case("a negative length", "sample", CKPT + "--max_new_tokens -1", "--max_new_tokens must be an integer from 1 to 100,000, got -1"),
    Case("a negative seed", "sample", CKPT + "--seed -1", "--seed must be an integer from 0 to 2**63 - 1, got -1"),
    Case("a seed of 2**64", "sample", CKPT + "--seed 18446744073709551616",
         "--seed must be an integer from 0 to 2**63 - 1, got 18446744073709551616"),
    Case("a misspelt flag", "sample", CKPT + "--alhpa 0.3", "unrecognized arguments: --alhpa 0.3"),
    Case("--device cuda without CUDA", "sample", CKPT + "--device cuda",
         "device 'cuda' asked for, but CUDA is not available here"),
    Case("a device that does not exist", "sample", CKPT + "--device foo", "device 'foo' is not a device"),
    Case("zero threads", "sample", CKPT + "--threads 0", "--threads must be an integer from 1 to 4,096, got 0"),
    Case("a mix from a checkpoint with no calibrated dial", "sample", CKPT + "--mix 0.3",
         "--mix: {ws}/run/ckpt.pt has no calibrated dial; make one with: python calibrate.py --ckpt {ws}/run/ckpt.pt"),
    Case("a mix above 1", "sample", CKPT + "--mix 1.5", "--mix must be in [0, 1], got 1.5"),
    Case("a mix that is not a number", "sample", CKPT + "--mix half", "--mix: 'half' is not a number"),
    Case("both --mix and --alpha", "sample", CKPT + "--mix 0.3 --alpha 0.2",
         "argument --alpha: not allowed with argument --mix"),
    # sample.py: a dial over many sources
    Case("a voice that names no source", "sample", VOICES + "--voice psalms",
         "--voice: no source named 'psalms': this checkpoint's sources are stories, plays, third (or 'all' for "
         "uniform mode)"),
    Case("a voice on two sources that names neither", "sample", CKPT + "--voice third",
         "--voice: no source named 'third': this checkpoint's sources are stories, plays (or 'all' for uniform mode)"),
    Case("a mixture with a negative weight", "sample", VOICES + "--voice stories=-1,plays=2",
         "--voice: voice 'stories=-1,plays=2': weights must be finite and not negative, got -1"),
    Case("a mixture whose weights sum to 0", "sample", VOICES + "--voice stories=0,plays=0",
         "--voice: voice 'stories=0,plays=0': the weights must sum to a positive number"),
    Case("a mixture weight that is not a number", "sample", VOICES + "--voice stories=lots",
         "--voice: voice 'stories=lots': the weight of 'stories' must be a number, got 'lots'"),
    Case("an infinite mixture weight", "sample", VOICES + "--voice stories=inf",
         "--voice: voice 'stories=inf': weights must be finite and not negative, got inf"),
    Case("a mixture part without a weight", "sample", VOICES + "--voice stories=1,plays",
         "--voice: voice 'stories=1,plays': write NAME=WEIGHT for every part of a mixture, got 'plays'"),
    Case("an alpha on a many-source dial", "sample", VOICES + "--alpha 0.5",
         "--alpha: this checkpoint's dial is a mixture of its 3 sources (pool), not one line; use --voice NAME, "
         "--voice NAME=W,NAME=W or --voice all"),
    Case("a mix on a many-source dial", "sample", VOICES + "--mix 0.5",
         "--mix: this checkpoint's dial is a mixture of its 3 sources (pool), not one line; use --voice NAME, "
         "--voice NAME=W,NAME=W or --voice all"),
    Case("calibrating a many-source dial", "calibrate", VOICES,
         "{ws}/voices/ckpt.pt has 3 sources on the pool dial; the calibrated mix is a two-source feature (for many "
         "sources: evaluate.py, sample.py --voice and python -m bench.voices)"),
    Case("an unknown geometry", "train", TINY + "--geometry cube",
         "argument --geometry: invalid choice: 'cube'"),
    Case("a uniform share of 1", "train", TINY + "--uniform_share 1", "uniform_share must be in [0, 1), got 1.0"),
    Case("a NaN uniform share", "train", TINY + "--uniform_share nan", "uniform_share must be in [0, 1), got nan"),
    Case("a shared share above 1", "train", TINY + "--geometry pool --shared 2", "shared must be in [0, 1], got 2.0"),
    Case("a dial concentration of 0", "train", TINY + "--geometry pool --dial_beta 0",
         "dial_beta must be in (0, 100], got 0.0"),
    # serve.py: refused at start-up, before it listens
    Case("a missing checkpoint, to serve", "serve", "--ckpt {ws}/no/ckpt.pt", "checkpoint not found: {ws}/no/ckpt.pt"),
    Case("a corrupt checkpoint, to serve", "serve", "--ckpt {ws}/flipped.pt", "{ws}/flipped.pt failed its checksum"),
    Case("a port out of range", "serve", CKPT + "--port 70000", "--port must be an integer from 0 to 65,535, got 70000"),
    Case("--max_batch 0", "serve", CKPT + "--max_batch 0", "--max_batch must be an integer from 1 to 65,536, got 0"),
    Case("--max_queue 0", "serve", CKPT + "--max_queue 0", "--max_queue must be an integer from 1 to 1,000,000, got 0"),
    Case("--max_per_client 0", "serve", CKPT + "--max_per_client 0",
         "--max_per_client must be an integer from 1 to 65,536, got 0"),
    Case("a negative --max_queued_per_client", "serve", CKPT + "--max_queued_per_client -3",
         "--max_queued_per_client must be an integer from 1 to 1,000,000, got -3"),
    Case("--max_connections 0", "serve", CKPT + "--max_connections 0",
         "--max_connections must be an integer from 1 to 1,000,000, got 0"),
    Case("a request deadline of zero", "serve", CKPT + "--timeout 0",
         "--timeout must be a number above 0 and at most 86,400, got 0.0"),
    Case("an endless header deadline", "serve", CKPT + "--header_timeout inf",
         "--header_timeout must be a number above 0 and at most 86,400, got inf"),
    Case("an empty token", "serve", CKPT + "--token=", "--token must not be empty"),
    # calibrate.py
    Case("a calibration grid of one alpha", "calibrate", CKPT + "--grid 1", "--grid must be an integer from 2 to 10,001, got 1"),
    Case("zero calibration samples", "calibrate", CKPT + "--samples 0", "--samples must be an integer from 1 to 100,000, got 0"),
    Case("a vanilla checkpoint to calibrate", "calibrate", "--ckpt {ws}/vanilla.pt",
         "{ws}/vanilla.pt holds a vanilla (ungated) model: there is no dial to sweep"),
    Case("a corrupt checkpoint to calibrate", "calibrate", "--ckpt {ws}/flipped.pt",
         "{ws}/flipped.pt failed its checksum"),
    # checkpoints, as every tool reads them
    Case("a missing checkpoint", "sample", "--ckpt {ws}/no/ckpt.pt", "checkpoint not found: {ws}/no/ckpt.pt"),
    Case("a checkpoint path that is a folder", "sample", "--ckpt {ws}/folder",
         "{ws}/folder is not a checkpoint file (a folder, a pipe or a device)"),
    Case("a truncated checkpoint", "sample", "--ckpt {ws}/truncated.pt",
         "{ws}/truncated.pt is not a readable checkpoint (truncated or corrupt?)"),
    Case("a text file as checkpoint", "sample", "--ckpt {ws}/notes.txt",
         "{ws}/notes.txt is not a readable checkpoint (truncated or corrupt?)"),
    Case("a foreign .pt file", "sample", "--ckpt {ws}/foreign.pt", "{ws}/foreign.pt is not an abcGPT checkpoint"),
    Case("a checkpoint that would run code when unpickled", "sample", "--ckpt {ws}/evil.pt",
         "{ws}/evil.pt is not a readable checkpoint (truncated or corrupt?)"),
    Case("a checkpoint with one byte flipped in a tensor", "sample", "--ckpt {ws}/flipped.pt",
         "{ws}/flipped.pt failed its checksum: model/"),
    Case("a checkpoint with one byte changed in its settings", "sample", "--ckpt {ws}/retitled.pt",
         "{ws}/retitled.pt failed its checksum: its settings (configs, tokenizer, names or counters) changed"),
    Case("a checkpoint whose config does not match its weights", "sample", "--ckpt {ws}/mismatch.pt",
         "{ws}/mismatch.pt does not hold a usable model: Error(s) in loading state_dict for GPT: size mismatch"),
    Case("a corrupt checkpoint, to evaluate", "evaluate", "--ckpt {ws}/flipped.pt", "{ws}/flipped.pt failed its checksum"),
    Case("a corrupt checkpoint, to report on", "report", "--ckpt {ws}/flipped.pt --out_dir {ws}/rep",
         "{ws}/flipped.pt failed its checksum"),
    Case("a corrupt checkpoint, to resume", "train", "--resume --out_dir {ws}/flippedrun",
         "{ws}/flippedrun/ckpt.pt failed its checksum"),
    Case("a corrupt checkpoint, to inspect", "inspect", "{ws}/flipped.pt", "{ws}/flipped.pt failed its checksum"),
    Case("a truncated checkpoint, to inspect", "inspect", "{ws}/truncated.pt",
         "{ws}/truncated.pt is not a readable checkpoint"),
    Case("a missing checkpoint, to inspect", "inspect", "{ws}/no.pt", "checkpoint not found: {ws}/no.pt"),
    Case("a missing checkpoint, to sort", "permute", "{ws}/no.pt {ws}/sorted.pt", "checkpoint not found: {ws}/no.pt"),
    Case("a vanilla checkpoint, to sort", "permute", "{ws}/vanilla.pt {ws}/sorted.pt",
         "{ws}/vanilla.pt holds a vanilla model: there are no scores to sort by"),
    Case("a corrupt checkpoint, to sort", "permute", "{ws}/flipped.pt {ws}/sorted.pt",
         "{ws}/flipped.pt failed its checksum"),
    # evaluate.py
    Case("--max_windows 0", "evaluate", CKPT + "--max_windows 0", "--max_windows must be an integer from 1 to 1,000,000,000, got 0"),
    Case("--max_windows -1", "evaluate", CKPT + "--max_windows -1", "--max_windows must be an integer from 1 to 1,000,000,000, got -1"),
    Case("--batch_size 0", "evaluate", CKPT + "--batch_size 0", "--batch_size must be an integer from 1 to 1,048,576, got 0"),
    Case("--out in a folder that does not exist", "evaluate", CKPT + "--out {ws}/no/eval.json",
         "--out: the folder {ws}/no does not exist"),
    Case("--out inside a file", "evaluate", CKPT + "--out {ws}/notes.txt/eval.json",
         "--out: the folder {ws}/notes.txt does not exist"),
    Case("--out that is a folder", "evaluate", CKPT + "--out {ws}/folder", "--out: {ws}/folder is a folder, not a file"),
    Case("--out onto the checkpoint itself", "evaluate", CKPT + "--out {ws}/run/ckpt.pt",
         "--out: {ws}/run/ckpt.pt is (or is named like) a checkpoint; refusing to write over it"),
    Case("--out onto another checkpoint", "evaluate", CKPT + "--out {ws}/vanilla.pt",
         "--out: {ws}/vanilla.pt is (or is named like) a checkpoint; refusing to write over it"),
    Case("--out onto a checkpoint not named .pt", "evaluate", CKPT + "--out {ws}/ckpt-copy",
         "--out: {ws}/ckpt-copy is (or is named like) a checkpoint; refusing to write over it"),
    Case("a vanilla checkpoint to sweep", "evaluate", "--ckpt {ws}/vanilla.pt",
         "{ws}/vanilla.pt holds a vanilla (ungated) model: there is no dial to sweep"),
    Case("two source files swapped under the same names", "evaluate",
         CKPT + "--sources stories={ws}/plays.txt,plays={ws}/stories.txt",
         "source 'stories': {ws}/plays.txt is not the text the checkpoint was trained on under that name"),
    Case("another file under a source's name", "evaluate",
         CKPT + "--sources stories={ws}/stories-edited.txt,plays={ws}/plays.txt",
         "source 'stories': {ws}/stories-edited.txt is not the text the checkpoint was trained on"),
    Case("sources named otherwise than in training", "evaluate",
         CKPT + "--sources a={ws}/stories.txt,b={ws}/plays.txt",
         "the checkpoint was trained on ['stories', 'plays'], in that order; name the same sources"),
    Case("sources with characters the checkpoint lacks", "evaluate",
         CKPT + "--sources stories={ws}/q.txt,plays={ws}/plays.txt",
         "the sources have text the checkpoint's tokenizer lacks"),
    Case("a source file that does not exist, to evaluate", "evaluate",
         CKPT + "--sources stories={ws}/no.txt,plays={ws}/plays.txt", "source 'stories': file not found: {ws}/no.txt"),
    Case("--device foo, to evaluate", "evaluate", CKPT + "--device foo", "device 'foo' is not a device"),
    Case("zero threads, to evaluate", "evaluate", CKPT + "--threads 0", "--threads must be an integer from 1 to 4,096, got 0"),
    # report.py
    Case("no --out_dir", "report", CKPT, "the following arguments are required: --out_dir"),
    Case("--out_dir that is a file", "report", CKPT + "--out_dir {ws}/notes.txt",
         "--out_dir: {ws}/notes.txt is a file, not a folder"),
    Case("--samples 0", "report", CKPT + "--out_dir {ws}/rep --samples 0", "--samples must be an integer from 1 to 100,000, got 0"),
    Case("--sample_tokens 0", "report", CKPT + "--out_dir {ws}/rep --sample_tokens 0",
         "--max_new_tokens must be an integer from 1 to 100,000, got 0"),
    Case("--max_windows 0, to report", "report", CKPT + "--out_dir {ws}/rep --max_windows 0",
         "--max_windows must be an integer from 1 to 1,000,000,000, got 0"),
    Case("a negative seed, to report", "report", CKPT + "--out_dir {ws}/rep --seed -5",
         "--seed must be an integer from 0 to 2**63 - 1, got -5"),
    Case("a vanilla checkpoint to report on", "report", "--ckpt {ws}/vanilla.pt --out_dir {ws}/rep",
         "{ws}/vanilla.pt holds a vanilla (ungated) model: there is no dial to sweep"),
    Case("a baseline folder holding a gated model", "report", "--ckpt {ws}/badbase/ckpt.pt --out_dir {ws}/rep",
         "{ws}/badbase/baseline-stories/ckpt.pt is not a single-source baseline for 'stories'"),
    # train.py: the model's shape
    Case("--n_head 0", "train", TINY + "--n_head 0", "n_head must be an integer from 1 to 4,096, got 0"),
    Case("--n_layer -1", "train", TINY + "--n_layer -1", "n_layer must be an integer from 1 to 1,024, got -1"),
    Case("--block_size -4", "train", TINY + "--block_size -4", "block_size must be an integer from 1 to 1,048,576, got -4"),
    Case("--block_size 0", "train", TINY + "--block_size 0", "block_size must be an integer from 1 to 1,048,576, got 0"),
    Case("--n_embd 0", "train", TINY + "--n_embd 0", "n_embd must be an integer from 1 to 65,536, got 0"),
    Case("heads that do not divide the width", "train", TINY + "--n_embd 30 --n_head 4",
         "n_embd (30) must be a multiple of n_head (4)"),
    Case("--dropout 1", "train", TINY + "--dropout 1", "dropout must be in [0, 1), got 1.0"),
    Case("--narrowness 0", "train", TINY + "--narrowness 0", "narrowness must be a number above 0 and at most 100, got 0.0"),
    Case("a block longer than a source's val split", "train", TINY + "--block_size 4000",
         "source 'stories': its val split has"),
    # train.py: optimisation and run settings
    Case("--batch_size 0", "train", TINY + "--batch_size 0", "batch_size must be an integer from 1 to 1,048,576, got 0"),
    Case("--grad_accum 0", "train", TINY + "--grad_accum 0", "grad_accum must be an integer from 1 to 1,048,576, got 0"),
    Case("--max_iters -1", "train", TINY + "--max_iters -1", "max_iters must be an integer from 0 to 1,000,000,000, got -1"),
    Case("--warmup_iters -1", "train", TINY + "--warmup_iters -1", "warmup_iters must be an integer from 0 to 1,000,000,000, got -1"),
    Case("--eval_interval 0", "train", TINY + "--eval_interval 0",
         "eval_interval must be an integer from 1 to 1,000,000,000, got 0"),
    Case("a NaN learning rate", "train", TINY + "--learning_rate nan",
         "learning_rate must be a number above 0 and at most 10, got nan"),
    Case("--lr_decay_iters -5", "train", TINY + "--lr_decay_iters -5", "lr_decay_iters must be an integer from 0 to 1,000,000,000, got -5"),
    Case("--val_fraction 1.5", "train", TINY + "--val_fraction 1.5", "val_fraction must be between 0 and 1, got 1.5"),
    Case("--beta2 1", "train", TINY + "--beta2 1", "beta1 and beta2 must be in [0, 1)"),
    Case("--grad_clip -1", "train", TINY + "--grad_clip -1", "grad_clip must be a number from 0 to 1,000,000, got -1.0"),
    Case("a seed of 2**64, to train", "train", TINY + "--seed 18446744073709551616",
         "seed must be an integer from 0 to 2**63 - 1, got 18446744073709551616"),
    Case("a seed that is not a number", "train", TINY + "--seed lucky", "argument --seed: invalid int value: 'lucky'"),
    Case("--tokenizer wordpiece", "train", TINY + "--tokenizer wordpiece",
         "argument --tokenizer: invalid choice: 'wordpiece'"),
    Case("--gate_backend tpu", "train", TINY + "--gate_backend tpu", "argument --gate_backend: invalid choice: 'tpu'"),
    Case("--alpha_mode token", "train", TINY + "--alpha_mode token", "argument --alpha_mode: invalid choice: 'token'"),
    Case("--dtype float8", "train", TINY + "--dtype float8", "argument --dtype: invalid choice: 'float8'"),
    Case("--compile maybe", "train", TINY + "--compile maybe", "argument --compile: expected true or false, got 'maybe'"),
    Case("--preset gpu", "train", TINY + "--preset gpu", "argument --preset: invalid choice: 'gpu'"),
    Case("folded with per-sequence alphas", "train", TINY + "--gate_backend folded --alpha_mode sequence",
         "gate_backend='folded' takes one alpha per batch"),
    Case("--gate_backend triton without CUDA", "train", TINY + "--gate_backend triton",
         "gate_backend='triton' needs a CUDA device", "no_interpreter"),
    Case("--device cuda without CUDA, to train", "train", TINY + "--device cuda",
         "device 'cuda' asked for, but CUDA is not available here"),
    Case("--device foo, to train", "train", TINY + "--device foo", "device 'foo' is not a device"),
    Case("zero threads, to train", "train", TINY + "--threads 0", "--threads must be an integer from 1 to 4,096, got 0"),
    Case("a gated run with --only_source", "train", TINY + "--only_source stories",
         "only_source trains a vanilla baseline: set gated=false"),
    Case("--only_source naming no source", "train", TINY + "--gated false --only_source poems",
         "only_source 'poems' is not one of the sources ['stories', 'plays']"),
    Case("a learning rate of 1e30", "train", TINY + "--learning_rate 1e30 --min_lr 1e30",
         "learning_rate must be a number above 0 and at most 10, got 1e+30"),
    Case("--tokenizer bpe with GPT-2's files out of reach", "train", TINY + "--tokenizer bpe",
         "could not load the 'gpt2' BPE vocabulary", "offline_bpe"),
    # train.py: where the run goes
    Case("--out_dir that is a file", "train", TINY + "--out_dir {ws}/notes.txt",
         "out_dir: {ws}/notes.txt is a file, not a folder"),
    Case("--out_dir that already holds a run", "train", TINY + "--out_dir {ws}/run",
         "out_dir {ws}/run already holds a run (ckpt.pt, best.pt, log.jsonl): continue it with --resume, "
         "or replace it with --overwrite"),
    Case("--resume where there is no run", "train", "--resume --out_dir {ws}/folder",
         "--resume: {ws}/folder holds no run to continue (no ckpt.pt): start one without --resume"),
    Case("--resume with another architecture", "train", "--resume --out_dir {ws}/run --n_embd 64",
         "cannot resume with a different n_embd than the checkpoint's (n_embd=32)"),
    Case("--resume with other sources", "train",
         "--resume --out_dir {ws}/run --sources a={ws}/stories.txt,b={ws}/plays.txt",
         "cannot resume with other sources than the checkpoint's ['stories', 'plays']"),
    # train.py: the sources
    Case("one source only", "train", TINY + "--sources stories={ws}/stories.txt",
         "the dial needs at least two sources, got 1"),
    Case("a source with an empty path", "train", TINY + "--sources a=,b={ws}/plays.txt",
         "source 'a' has an empty path: write a=PATH"),
    Case("a source with no name", "train", TINY + "--sources ={ws}/stories.txt,b={ws}/plays.txt",
         "source '={ws}/stories.txt' has no name: write NAME or NAME=PATH"),
    Case("an unknown built-in source", "train", TINY + "--sources shakespeare,b={ws}/plays.txt",
         "unknown source 'shakespeare': built in are tinystories, tinyshakespeare"),
    Case("two sources with one name", "train", TINY + "--sources a={ws}/stories.txt,a={ws}/plays.txt",
         "source names must differ"),
    Case("a source file that does not exist", "train", TINY + "--sources a={ws}/no.txt,b={ws}/plays.txt",
         "source 'a': file not found: {ws}/no.txt"),
    Case("an empty source file", "train", TINY + "--sources a={ws}/empty.txt,b={ws}/plays.txt",
         "source 'a': {ws}/empty.txt is empty"),
    Case("a source that is a folder", "train", TINY + "--sources a={ws}/folder,b={ws}/plays.txt",
         "source 'a': {ws}/folder is not a regular file (a folder, a pipe or a device)"),
    Case("a source that is not UTF-8", "train", TINY + "--sources a={ws}/latin1.txt,b={ws}/plays.txt",
         "source 'a': {ws}/latin1.txt is not UTF-8 text (byte 3)"),
    # nothing is written over what the user did not name as an output (issue: runs nothing can damage)
    Case("permute onto an existing file", "permute", "{ws}/run/ckpt.pt {ws}/notes.txt",
         "dest: {ws}/notes.txt exists and is not a new path; refusing to write over it"),
    Case("permute onto a device", "permute", "{ws}/run/ckpt.pt /dev/full",
         "dest: /dev/full is in a system folder; refusing to write there"),
    Case("permute onto its own source without --in_place", "permute", "{ws}/run/ckpt.pt {ws}/run/ckpt.pt",
         "dest: {ws}/run/ckpt.pt exists and is not a new path; refusing to write over it"),
    Case("permute with nowhere to write", "permute", "{ws}/run/ckpt.pt",
         "give dest, a new file to write, or --in_place to rewrite source itself"),
    Case("an evaluation into a device", "evaluate", CKPT + "--out /dev/full",
         "--out: /dev/full is in a system folder; refusing to write there"),
    Case("an evaluation over a file that is not one", "evaluate", CKPT + "--out {ws}/notes.txt",
         "--out: {ws}/notes.txt exists and is not an evaluation; refusing to write over it"),
    Case("a report over files report.py did not write", "report", CKPT + "--out_dir {ws}/foreign-report",
         "--out_dir: {ws}/foreign-report/report.md exists and is not part of a report that report.py wrote; "
         "refusing to write over it"),
    Case("a report into /dev", "report", CKPT + "--out_dir /dev/abc",
         "--out_dir: /dev/abc is a system folder; refusing to write there"),
    Case("a run folder whose ckpt.pt is not a checkpoint", "train", TINY.replace("{ws}/fresh", "{ws}/fakerun")
         + "--overwrite", "out_dir: {ws}/fakerun/ckpt.pt is not a checkpoint; refusing to write over it"),
    # one writer per run folder
    Case("a resume while another process writes the run", "train", "--resume --out_dir {ws}/run",
         "{ws}/run is being written by pid", env="locked"),
    Case("a calibration while another process writes the run", "calibrate", CKPT,
         "{ws}/run is being written by pid", env="locked"),
    # a resume checks content, not names
    Case("a resume on swapped sources", "train",
         "--resume --out_dir {ws}/run --sources stories={ws}/plays.txt,plays={ws}/stories.txt",
         "source 'stories' is not the text the run was trained on"),
    Case("--new_sources without --resume", "train", TINY + "--new_sources",
         "--new_sources goes with --resume: a new run records whatever sources it has"),
    Case("baselines trained on other text", "report", "--ckpt {ws}/otherbase/ckpt.pt --out_dir {ws}/rep",
         "{ws}/otherbase/baseline-stories/best.pt was trained on other text for 'stories' than the run was"),
    # work checked before it starts
    Case("a source that is a device", "train", TINY + "--sources a=/dev/zero,b={ws}/plays.txt",
         "source 'a': /dev/zero is not a regular file (a folder, a pipe or a device)"),
    Case("a batch beyond its bound", "train", TINY + "--batch_size 1000000000",
         "batch_size must be an integer from 1 to 1,048,576, got 1000000000"),
    Case("a batch that cannot fit in memory", "train", TINY + "--batch_size 1000000 --block_size 1000",
         "training at batch_size 1000000 needs about"),
    Case("a width beyond its bound", "train", TINY + "--n_embd 131072",
         "n_embd must be an integer from 1 to 65,536, got 131072"),
    Case("a width that cannot fit in memory", "train", TINY + "--n_embd 65536", "training at batch_size 4 needs about"),
    Case("a billion samples at once", "sample", CKPT + "--num_samples 1000000000",
         "--samples must be an integer from 1 to 100,000, got 1000000000"),
    Case("a generation that would never end", "sample", CKPT + "--max_new_tokens 1000000000",
         "--max_new_tokens must be an integer from 1 to 100,000, got 1000000000"),
    Case("a billion report samples", "report", CKPT + "--out_dir {ws}/rep --samples 1000000000",
         "--samples must be an integer from 1 to 100,000, got 1000000000"),
    Case("report samples that would never end", "report", CKPT + "--out_dir {ws}/rep --sample_tokens 1000000000",
         "--max_new_tokens must be an integer from 1 to 100,000, got 1000000000"),
    Case("a billion calibration samples", "calibrate", CKPT + "--samples 1000000000",
         "--samples must be an integer from 1 to 100,000, got 1000000000"),
    Case("a billion windows per evaluation batch", "evaluate", CKPT + "--batch_size 1000000000",
         "--batch_size must be an integer from 1 to 1,048,576, got 1000000000"),
    Case("a billion requests per serving batch", "serve", CKPT + "--max_batch 1000000000",
         "--max_batch must be an integer from 1 to 65,536, got 1000000000"),
    # issue 28: the same kinds of defect, closed as classes
    Case("a weight that is NaN, to sample", "sample", "--ckpt {ws}/nan/ckpt.pt",
         "{ws}/nan/ckpt.pt holds a non-finite value (NaN or inf) in weight transformer.h.0.attn.c_attn.weight"),
    Case("a weight that is NaN, to evaluate", "evaluate", "--ckpt {ws}/nan/ckpt.pt",
         "{ws}/nan/ckpt.pt holds a non-finite value (NaN or inf) in weight"),
    Case("a weight that is NaN, to calibrate", "calibrate", "--ckpt {ws}/nan/ckpt.pt",
         "{ws}/nan/ckpt.pt holds a non-finite value (NaN or inf) in weight"),
    Case("a weight that is NaN, to report on", "report", "--ckpt {ws}/nan/ckpt.pt --out_dir {ws}/rep",
         "{ws}/nan/ckpt.pt holds a non-finite value (NaN or inf) in weight"),
    Case("a weight that is NaN, to serve", "serve", "--ckpt {ws}/nan/ckpt.pt",
         "{ws}/nan/ckpt.pt holds a non-finite value (NaN or inf) in weight"),
    Case("a weight that is NaN, to resume", "train", "--resume --out_dir {ws}/nan",
         "{ws}/nan/ckpt.pt holds a non-finite value (NaN or inf) in weight"),
    Case("a weight that is NaN, to permute", "permute", "{ws}/nan/ckpt.pt {ws}/sorted.pt",
         "{ws}/nan/ckpt.pt holds a non-finite value (NaN or inf) in weight"),
    Case("a source named like a path", "train", TINY + "--sources ../../../victim={ws}/stories.txt,plays={ws}/plays.txt "
         "--baselines --overwrite", "source name '../../../victim' is not allowed: use letters, digits"),
    Case("a source named '..'", "train", TINY + "--sources ..={ws}/stories.txt,plays={ws}/plays.txt",
         "source name '..' is not allowed"),
    Case("a baseline named like a path", "train", TINY + "--gated false --only_source ../run",
         "source name '../run' is not allowed"),
    Case("a lock that is a link to another file", "calibrate", "--ckpt {ws}/lock-link/ckpt.pt",
         "{ws}/lock-link/.lock is not a lock file (a link): remove it if no abcgpt tool is using this folder"),
    Case("a lock that is a folder", "calibrate", "--ckpt {ws}/lock-folder/ckpt.pt",
         "{ws}/lock-folder/.lock is not a lock file (a folder)"),
    Case("a lock that is a pipe", "permute", "{ws}/lock-pipe/ckpt.pt --in_place",
         "{ws}/lock-pipe/.lock is not a lock file (a pipe or a device)"),
    Case("a temperature of 1e300", "sample", CKPT + "--temperature 1e300",
         "--temperature must be a number above 0 and at most 100, got 1e+300"),
    Case("a top-k of 10**30", "sample", CKPT + "--top_k " + str(10**30),
         "--top_k must be an integer from 1 to 1,048,576, got " + str(10**30)),
    Case("10**20 threads", "sample", CKPT + "--threads " + str(10**20),
         "--threads must be an integer from 1 to 4,096, got " + str(10**20)),
    Case("a mask_seed of 2**64", "train", TINY + "--mask_seed " + str(2**64),
         "mask_seed must be an integer from 0 to 2**63 - 1, got " + str(2**64)),
    Case("an infinite learning rate", "train", TINY + "--learning_rate inf",
         "learning_rate must be a number above 0 and at most 10, got inf"),
    Case("a prompt file that is a pipe", "sample", CKPT + "--start FILE:{ws}/fifo",
         "--start: prompt file {ws}/fifo is not a regular file (a folder, a pipe or a device)"),
    Case("a prompt file that is /dev/zero", "sample", CKPT + "--start FILE:/dev/zero",
         "--start: prompt file /dev/zero is not a regular file"),
    Case("a prompt file of 2 MiB", "sample", CKPT + "--start FILE:{ws}/big-prompt.txt",
         "--start: prompt file {ws}/big-prompt.txt has 2,097,152 bytes; a prompt may have at most 1,048,576"),
    Case("an out_dir that is a loop of links", "train", TINY + "--out_dir {ws}/loop-a",
         "out_dir: {ws}/loop-a is a loop of symbolic links"),
    Case("an evaluation output that is a loop of links", "evaluate", CKPT + "--out {ws}/loop-a",
         "--out: {ws}/loop-a is a loop of symbolic links"),
    Case("a report folder that is a loop of links", "report", CKPT + "--out_dir {ws}/loop-a",
         "--out_dir: {ws}/loop-a is a loop of symbolic links"),
    Case("a permuted checkpoint into a loop of links", "permute", "{ws}/run/ckpt.pt {ws}/loop-a",
         "dest: {ws}/loop-a is a loop of symbolic links"),
    Case("a checkpoint that is a loop of links", "evaluate", "--ckpt {ws}/loop-a",
         "--ckpt: {ws}/loop-a is a loop of symbolic links"),
    Case("a folder to sort in place", "permute", "{ws}/folder --in_place",
         "{ws}/folder is not a checkpoint file (a folder, a pipe or a device)"),
    Case("a pipe as the checkpoint to calibrate", "calibrate", "--ckpt {ws}/fifo",
         "{ws}/fifo is not a checkpoint file (a folder, a pipe or a device)"),
    Case("an empty report folder", "report", CKPT + "--out_dir=", "--out_dir is empty: name a path"),
    Case("an empty out_dir", "train", TINY + "--out_dir=", "out_dir is empty: name a folder"),
    Case("a folder holding only a log, for a fresh run", "train", TINY + "--out_dir {ws}/logonly",
         "out_dir {ws}/logonly holds only the log of a run that saved no checkpoint: start that run from nothing "
         "with --resume (its log is kept), or clear it with --overwrite"),
    Case("another run's best.pt beside the checkpoint", "report", "--ckpt {ws}/mixed/ckpt.pt --out_dir {ws}/rep",
         "{ws}/mixed/best.pt is not {ws}/mixed/ckpt.pt's best checkpoint: it is of another run"),
    Case("a baseline cut short", "report", "--ckpt {ws}/shortbase/ckpt.pt --out_dir {ws}/rep",
         "{ws}/shortbase/baseline-stories/ckpt.pt stopped at step 2 of 5: finish it with python train.py --resume "
         "--baselines --out_dir {ws}/shortbase"),
    # a checkpoint from another version
    Case("a checkpoint with a field this version does not know", "inspect", "{ws}/future.pt",
         "{ws}/future.pt has field 'experts', which abcgpt 0.1.0 does not know: it was written by abcgpt 9.9.0"),
    Case("a resume from a checkpoint with a setting this version does not know", "train",
         "--resume --out_dir {ws}/futurerun", "{ws}/futurerun/ckpt.pt: its model_config has setting 'n_experts'"),
]


def command(case):
    """The case as a user types it, with workspace paths relative."""
    script = {"permute": "python -m abcgpt.tools.permute", "inspect": "python -m abcgpt.tools.inspect"}.get(
        case.tool, f"{case.tool}.py")
    args = case.args.replace(TINY, "... ").replace("{ws}/", "").strip()
    return f"{script} {args}".replace("|", "\\|")


def bad_input_table():
    lines = ["| bad input | command | what it gets |", "| --- | --- | --- |"]
    for case in CASES:
        message = case.message.replace("{ws}/", "").replace("|", "\\|")
        lines.append(f"| {case.what} | `{command(case)}` | `error: {message}` |")
    return "\n".join(lines)


def page_with_table(page):
    return with_table(page, "bad-input", bad_input_table())


@pytest.fixture(scope="module")
def template(trained_checkpoint, corpus_files, tmp_path_factory):
    """A workspace: the trained run, a vanilla checkpoint, the corpora, and damaged or odd files."""
    from conftest import tiny_config

    from abcgpt.core.checkpoint import load_checkpoint, save_checkpoint
    from abcgpt.training.trainer import Trainer

    ws = tmp_path_factory.mktemp("workspace")
    shutil.copytree(trained_checkpoint.parent, ws / "run")
    stories, plays = corpus_files
    shutil.copy(stories, ws / "stories.txt")
    shutil.copy(plays, ws / "plays.txt")
    (ws / "stories-edited.txt").write_text(stories.read_text().replace("happy", "glad"))
    (ws / "q.txt").write_text("one Q day € " * 200)
    (ws / "notes.txt").write_text("not a checkpoint\n")
    (ws / "empty.txt").write_text("")
    (ws / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (ws / "folder").mkdir()
    ckpt = ws / "run" / "ckpt.pt"
    (ws / "third.txt").write_text(" ".join(["alpha beta gamma delta"] * 400))
    voices = Trainer(tiny_config(corpus_files, ws / "voices", geometry="pool", uniform_share=0.2, max_iters=2,
                                 eval_interval=2, sources=[f"stories={stories}", f"plays={plays}",
                                                           f"third={ws / 'third.txt'}"]), log=lambda line: None)
    voices.train()
    shutil.copy(ckpt, ws / "ckpt-copy")
    (ws / "truncated.pt").write_bytes(ckpt.read_bytes()[:5000])
    torch.save({"weights": torch.zeros(3)}, ws / "foreign.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    with open(ws / "evil.pt", "wb") as f:
        pickle.dump({"format": "abcgpt-checkpoint-v2", "x": Evil()}, f)
    flip_byte(ckpt, ws / "flipped.pt", tensor_offset(ckpt, 0.5))
    (ws / "flippedrun").mkdir()
    shutil.copy(ws / "flipped.pt", ws / "flippedrun" / "ckpt.pt")
    raw = ckpt.read_bytes()
    at = raw.index(b"stories")  # a source name in the pickled settings
    (ws / "retitled.pt").write_bytes(raw[:at] + b"Stories" + raw[at + 7:])
    state = load_checkpoint(ckpt)
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "checksums")}
                    | {"model_config": {**state["model_config"], "n_embd": 16, "n_head": 2}}, ws / "mismatch.pt")
    vanilla = Trainer(tiny_config(corpus_files, ws / "vanilla-run", gated=False, max_iters=1, eval_interval=1),
                      log=lambda line: None)
    vanilla.train()
    shutil.move(ws / "vanilla-run" / "ckpt.pt", ws / "vanilla.pt")
    shutil.rmtree(ws / "vanilla-run")
    (ws / "badbase" / "baseline-stories").mkdir(parents=True)
    shutil.copy(ckpt, ws / "badbase" / "ckpt.pt")
    shutil.copy(ckpt, ws / "badbase" / "baseline-stories" / "ckpt.pt")
    (ws / "foreign-report").mkdir()
    (ws / "foreign-report" / "report.md").write_text("# my own notes\n")
    (ws / "fakerun").mkdir()
    (ws / "fakerun" / "ckpt.pt").write_text("not a checkpoint\n")
    other = Trainer(tiny_config(corpus_files, ws / "otherbase" / "baseline-stories", gated=False, only_source="stories",
                                max_iters=1, eval_interval=1,
                                sources=[f"stories={ws / 'stories-edited.txt'}", f"plays={plays}"]), log=lambda line: None)
    other.train()
    shutil.copy(ckpt, ws / "otherbase" / "ckpt.pt")
    make_issue_28_files(ws, ckpt, corpus_files)
    for name, where, field in (("future.pt", None, "experts"), ("futurerun/ckpt.pt", "model_config", "n_experts")):
        future = {k: v for k, v in state.items() if k not in ("format", "checksums")} | {"version": "9.9.0"}
        if where is None:
            future[field] = 1
        else:
            future[where] = {**future[where], field: 1}
        save_checkpoint(future, ws / name)
    return ws


def make_issue_28_files(ws, ckpt, corpus_files):
    """A run with one NaN weight (valid checksums), runs whose .lock is a link or a folder (or, made in each
    workspace, a pipe), a loop of links, a long prompt, a folder holding only a log, another run's best.pt and
    a cut-short baseline."""
    import os

    from conftest import tiny_config

    from abcgpt.training.run import Run
    from abcgpt.training.trainer import Trainer

    (ws / "nan").mkdir()
    run = Run.load(ckpt)
    run.model["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    run.save(ws / "nan" / "ckpt.pt")
    (ws / "victim.txt").write_text("another run's notes\n" * 100)
    for kind in ("link", "folder", "pipe"):  # the pipes are made in each workspace: copying one would block
        shutil.copytree(ckpt.parent, ws / f"lock-{kind}")
    os.symlink("../victim.txt", ws / "lock-link" / ".lock")
    (ws / "lock-folder" / ".lock").mkdir()
    os.symlink("loop-b", ws / "loop-a")
    os.symlink("loop-a", ws / "loop-b")
    (ws / "big-prompt.txt").write_text("a" * 2**21)
    (ws / "logonly").mkdir()
    (ws / "logonly" / "log.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (ws / "mixed").mkdir()
    shutil.copy(ckpt, ws / "mixed" / "ckpt.pt")
    shutil.copy(ws / "vanilla.pt", ws / "mixed" / "best.pt")
    (ws / "shortbase").mkdir()
    shutil.copy(ckpt, ws / "shortbase" / "ckpt.pt")
    stories, plays = corpus_files
    short = ws / "shortbase" / "baseline-stories"
    Trainer(tiny_config(corpus_files, short, gated=False, only_source="stories", max_iters=2, eval_interval=2),
            log=lambda line: None).train()
    cut = Run.load(short / "ckpt.pt")
    cut.train_config.max_iters = 5  # as if stopped at step 2 of the 5 its tokens needed
    cut.save(short / "ckpt.pt")
    (short / "best.pt").unlink()


def tensor_data(path):
    """(file offset, size) of each stored tensor's data in a checkpoint (a zip of uncompressed members)."""
    spans = []
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for entry in archive.infolist():
            if "/data/" in entry.filename and entry.file_size:
                f.seek(entry.header_offset + 26)  # the local header's name and extra-field lengths
                name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
                spans.append((entry.header_offset + 30 + name_len + extra_len, entry.file_size))
    return spans


def tensor_offset(path, fraction):
    """A file offset fraction of the way through the largest tensor's data."""
    start, size = max(tensor_data(path), key=lambda span: span[1])
    return start + int(fraction * (size - 1))


def flip_byte(source, dest, offset):
    data = bytearray(Path(source).read_bytes())
    data[offset] ^= 0x5A
    Path(dest).write_bytes(bytes(data))


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def workspace(template, tmp_path, monkeypatch):
    import os

    ws = tmp_path / "ws"
    shutil.copytree(template, ws, symlinks=True)  # links as links: a loop stays a loop
    os.mkfifo(ws / "fifo")
    os.mkfifo(ws / "lock-pipe" / ".lock")
    monkeypatch.chdir(ws)
    return ws


def run_main(tool, argv):
    """The tool's main(argv), as its command line runs it: (exit code, the one message it ended with)."""
    module = importlib.import_module(TOOLS[tool])
    try:
        module.main(argv)
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_gets_one_line_and_changes_nothing(case, workspace, monkeypatch, capsys):
    if case.env == "no_interpreter":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if case.env == "offline_bpe":
        import tiktoken

        def offline(name):
            raise ConnectionError("network is unreachable")

        monkeypatch.setattr(tiktoken, "get_encoding", offline)
    before = snapshot(workspace)
    holder = None
    if case.env == "locked":  # another process's lock, as an open file holding an OS lock
        holder = open(workspace / "run" / ".lock", "a+")
        holder.write("pid 4242 on elsewhere since then\n")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX)
        before = snapshot(workspace)
    try:
        code = run_main(case.tool, case.args.format(ws=workspace).split())
    finally:
        if holder is not None:
            holder.close()
    stderr = capsys.readouterr().err
    message = code if isinstance(code, str) else stderr.strip()
    assert code not in (0, None), f"exit 0 for {case.args}"
    assert "Traceback" not in stderr
    assert len(message.splitlines()) == 1, message
    assert message.startswith("error: " + case.message.format(ws=workspace)), message
    assert snapshot(workspace) == before, "an existing file changed, or a file appeared"


def test_the_bad_input_page_lists_every_case():
    assert len(CASES) >= 80
    page = TABLE.read_text()
    assert page_with_table(page) == page, "run: python tests/test_bad_input.py --write"


def test_every_single_byte_flip_in_tensor_data_is_refused(trained_checkpoint, tmp_path):
    """Three offsets (first, middle, last byte) in every stored tensor: weights, scores and Adam moments."""
    from abcgpt.core.checkpoint import CheckpointError, load_checkpoint

    damaged = tmp_path / "damaged.pt"
    spans = tensor_data(trained_checkpoint)
    assert len(spans) > 20
    for start, size in spans:
        for offset in {start, start + size // 2, start + size - 1}:
            flip_byte(trained_checkpoint, damaged, offset)
            with pytest.raises(CheckpointError, match="failed its checksum"):
                load_checkpoint(damaged)


if __name__ == "__main__" and "--write" in sys.argv:
    TABLE.write_text(page_with_table(TABLE.read_text()))
    print(f"updated {TABLE} ({len(CASES)} cases)")
