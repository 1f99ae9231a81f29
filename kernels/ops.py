"""The gated-MLP kernels as PyTorch ops with autograd, opaque to torch.compile.

gated_linear_gelu(x, W, b, gate)          -> GELU(x @ W.T + b) * gate
gated_mlp(x, W1, b1, W2, b2, gate)        -> gated_linear_gelu(x, W1, b1, gate) @ W2.T + b2

gate holds precomputed gates (abcgpt.gates.gate.gates_for): a vector over the hidden
units, or a (G, N) table whose row g serves x's rows g*M/G up to (g+1)*M/G, i.e.
one gate row per sequence of a flattened batch. Both ops are torch.library custom
ops with registered autograd and fake implementations, so torch.compile keeps them
as single nodes; outside torch.compile the same forward and backward run without
the custom op's dispatch, which costs several times the rest of a call's host
path. Each launch is planned once per layout of its tensors (shape, strides, element size,
alignment) and cached; a repeated call only makes its descriptors.

A forward that will be differentiated also stores the slope
dh/dz = GELU'(z) * gate, which its epilogue computes from the same exp2 and
reciprocal as h; the backward then multiplies by it, in the epilogue of the
down-projection's input-gradient matmul (gated_mlp) or as one elementwise product
(gated_linear_gelu). Weight and input gradients use cuBLAS. Nothing here waits for
the device.
"""
import contextlib
import dataclasses
import functools
import math
import os
from types import MappingProxyType
from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor
from torch.nn import functional as F
from triton.tools.tensor_descriptor import TensorDescriptor

from .gated_mlp import gated_down_grad_kernel, gated_up_deferred_kernel, gated_up_kernel

GELU_FORMS = ("none", "tanh")  # as nn.GELU(approximate=...)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the deferred forward finishes a kept tile in eighths where TMA allows (chunks 16 bytes wide at least): an
# eighth's work fits under one K step's wgmma on an H100, a quarter's does not (bench.kernel_static)
MOST_CHUNKS = 8
DECODE_ROWS = 64  # up to this many rows (decoding), one tile row: a program has one tile, nothing to defer into


@dataclasses.dataclass(frozen=True)
class Target:
    """The GPU a launch is planned for: what tile_config and the grid depend on."""
    sms: int
    capability: tuple


H100 = Target(sms=132, capability=(9, 0))  # what the static check, the compile count and the host timing plan for


class InterpreterUnavailable(RuntimeError):
    """Triton's CPU interpreter cannot run kernels under this Triton and numpy (interpreter_problem)."""


def _version(text):
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def interpreter_problem():
    """Why Triton's interpreter cannot launch a kernel here, or None: Triton 3.6's fails every launch with
    numpy 2.4 or newer (the GPU machine's stack; 3.9's runs)."""
    import numpy

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return f"Triton {triton.__version__}'s interpreter fails every launch with numpy {numpy.__version__}"
    return None


@functools.cache
def _cuda_target(index):
    props = torch.cuda.get_device_properties(index)
    return Target(props.multi_processor_count, (props.major, props.minor))


def target_of(device):
    """The Target of a CUDA device; None for Triton's CPU interpreter."""
    if INTERPRET or device.type != "cuda":
        return None
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


def tile_config(M, N, target, tma, deferred=False):
    """(tile sizes and launch settings, programs per SM) for an (M, N) output: a fixed choice per device
    generation, size class, load path and overlap design (deferred: gated_up_deferred_kernel), so a new
    shape compiles once and never sweeps configurations."""
    if target is None:  # the interpreter: small tiles, and a few programs to exercise the persistent loop
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1), 0
    major, per_sm = target.capability[0], 1
    if M <= DECODE_ROWS:  # decoding: a few rows
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    elif major >= 9 and tma and not deferred:  # two programs per SM, so that one's epilogue can run under the
        # other's matmul: 128 registers each, which pointer loads would spill from (bench.kernel_static checks)
        cfg, per_sm = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, maxnreg=128), 2
    elif major >= 9:  # one program per SM: pointer loads, or the deferred forward's two accumulators
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    elif major == 8:  # Ampere and Ada
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    return {**cfg, "enable_fp_fusion": True}, per_sm  # multiply-adds fused: Triton 3.10 stops doing it by default


def _programs(tiles, target, per_sm):
    """The persistent grid: per_sm programs per SM at most; the interpreter runs a few to exercise the loop."""
    if target is None:
        return max(1, min(tiles, 3))
    return max(1, min(tiles, per_sm * target.sms))


class Layout(NamedTuple):
    """What a launch plan reads of a tensor: its shape, strides, element size and whether its base is 16-byte
    aligned. Never its values, so planning never waits for the device."""
    shape: tuple
    strides: tuple
    itemsize: int
    aligned: bool


def layout_key(t):
    """A tensor's Layout as a plain tuple: the plan caches' key, cheaper to make than the Layout."""
    return t.shape, t.stride(), t.element_size(), t.data_ptr() % 16 == 0


def _tma_ok(layouts):
    """TMA's rules: 2-D, last dimension contiguous, other strides and the base 16-byte aligned."""
    return all(len(t.shape) == 2 and min(t.shape) > 0 and t.strides[1] == 1 and (t.strides[0] * t.itemsize) % 16 == 0
               and t.aligned for t in layouts)


POINTERS_ONLY = os.environ.get("ABCGPT_NO_TMA") == "1"  # read once: an environment lookup costs a launch's planning


@contextlib.contextmanager
def pointer_loads(on=True):
    """Inside the block, every launch loads through pointers (on) or through descriptors where TMA serves
    (off): how the tests and the static check cover both paths."""
    global POINTERS_ONLY
    before, POINTERS_ONLY = POINTERS_ONLY, on
    try:
        yield
    finally:
        POINTERS_ONLY = before


def _tma_serves(target, layouts, switched_off):
    """Tensor descriptors on Hopper and newer (and in the interpreter, which runs them too)."""
    return not switched_off and (target is None or target.capability[0] >= 9) and _tma_ok(layouts)


def use_tma(target, *tensors):
    """Whether these tensors go through tensor descriptors on target."""
    return _tma_serves(target, [Layout(*layout_key(t)) for t in tensors], POINTERS_ONLY)


# a descriptor's optional fields, as this Triton version defines them
_DESCRIPTOR_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TensorDescriptor)
                        if f.default is not dataclasses.MISSING}


def _descriptor(t, block):
    """TensorDescriptor.from_tensor(t, block) without its checks, which cost more than the rest of a launch's
    planning: the plan sent t here only where _tma_ok holds, and blocks come from tile_config."""
    descriptor = object.__new__(TensorDescriptor)
    descriptor.__dict__.update(_DESCRIPTOR_DEFAULTS, base=t, shape=t.shape, strides=t.stride(), block_shape=block)
    return descriptor


def _precision(dtype):
    # fp32 matmuls follow torch's TF32 switch; 16-bit inputs have only one precision
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _gate_layout(gate, M, block_m):
    """(GATE, rows per gate row, row stride) of a gate vector or table (see abcgpt_kernels.gated_mlp), from its
    Layout."""
    if len(gate.shape) == 1:
        return "vector", 1, 0
    rows = max(1, M // max(1, gate.shape[0]))
    return ("tile" if rows % block_m == 0 else "row"), rows, gate.strides[0]


@dataclasses.dataclass
class Launch:
    """A kernel launch decided in full: the static check (bench.kernel_static) compiles exactly these."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.kwargs)

    def with_settings(self, **settings):
        """The same launch with some compile-time settings changed (a plan's own are shared, read-only)."""
        return dataclasses.replace(self, kwargs={**self.kwargs, **settings})


class Plan(NamedTuple):
    """A launch decided for tensors of given layouts: made once per layout (the lru_caches below), so that a
    repeated call only wraps its tensors (launch)."""
    kernel: object
    grid: tuple
    blocks: tuple  # per tensor operand: the block of its TMA descriptor, or None for a plain pointer
    scalars: tuple  # the arguments after the tensors
    kwargs: MappingProxyType

    def launch(self, tensors):
        operands = tuple(t if block is None else _descriptor(t, block) for t, block in zip(tensors, self.blocks))
        return Launch(self.kernel, self.grid, operands + self.scalars, self.kwargs)


def _matmul_plan(a, b, outputs, M, N, target, b_is_nk, chunks, switched_off, deferred=False, programs_per_sm=None):
    """Tile settings, the descriptor blocks of A, B and the (M, N) outputs (which the epilogue stores in
    chunks column blocks per tile), or Nones where the TMA rules rule descriptors out, whether TMA serves,
    and the grid size; a, b and outputs are Layouts. deferred, where TMA serves, plans the deferred forward:
    its chunk count goes in the settings as LEVELS (2^LEVELS chunks). programs_per_sm overrides the
    configuration's, for the kernel benchmark."""
    tma = _tma_serves(target, (a, b, *outputs), switched_off)
    deferred = deferred and tma and M > DECODE_ROWS
    cfg, per_sm = tile_config(M, N, target, tma, deferred)
    per_sm = programs_per_sm or per_sm
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if deferred:
        chunks = min(MOST_CHUNKS, bn * outputs[0].itemsize // 16)
        cfg["LEVELS"] = chunks.bit_length() - 1
    if tma:
        blocks = ([bm, bk], [bn, bk] if b_is_nk else [bk, bn], *([bm, bn // chunks] for _ in outputs))
    else:
        blocks = (None,) * (2 + len(outputs))
    programs = _programs(triton.cdiv(M, bm) * triton.cdiv(N, bn), target, per_sm)
    return cfg, blocks, tma, programs


@functools.lru_cache(maxsize=4096)
def _up_plan(target, x, weight, has_bias, gate, h, slope, tanh, deferred, programs_per_sm, switched_off, precision):
    x, weight, gate, h, slope = (Layout(*key) for key in (x, weight, gate, h, slope))
    M, K = x.shape
    N = weight.shape[0]
    store_slope = math.prod(slope.shape) > 0
    if not store_slope:
        slope = h  # never written when STORE_SLOPE is off
    cfg, (x_block, w_block, h_block), tma, programs = _matmul_plan(
        x, weight, (h,), M, N, target, True, 4 if store_slope else 2, switched_off,
        deferred=not store_slope if deferred is None else deferred, programs_per_sm=programs_per_sm)
    gate_mode, rows_per_gate, stride_g = _gate_layout(gate, M, cfg["BLOCK_M"])
    kernel = gated_up_deferred_kernel if "LEVELS" in cfg else gated_up_kernel
    scalars = (M, N, K, rows_per_gate, programs, *x.strides, *weight.strides, stride_g, *h.strides, *slope.strides)
    return Plan(kernel, (programs,), (x_block, w_block, None, None, h_block, None), scalars, MappingProxyType(dict(
        HAS_BIAS=has_bias, GATE=gate_mode, STORE_SLOPE=store_slope, TANH=tanh, FAST_GELU=h.itemsize <= 2,
        ASM=target is not None, USE_TMA=tma, PRECISION=precision, **cfg)))


EMPTY = ((0,), (1,), 4, True)  # the layout key of "no slope"


def up_launch(x, weight, bias, gate, h, slope, tanh, target, deferred=None, programs_per_sm=None):
    """h = GELU(x @ weight.T + bias) * gate into h, and its slope dh/dz into slope unless slope is None or
    empty.
    The forward (no slope) defers its epilogue where TMA serves, and the training forward runs two programs
    per SM; deferred=False for the one, deferred=True for the other, and programs_per_sm, are for the kernel
    benchmark's comparison of overlap designs."""
    slope = h if slope is None or not slope.numel() else slope
    plan = _up_plan(target, layout_key(x), layout_key(weight), bias is not None, layout_key(gate), layout_key(h),
                    layout_key(slope) if slope is not h else EMPTY, tanh, deferred, programs_per_sm, POINTERS_ONLY,
                    _precision(x.dtype))
    return plan.launch((x, weight, bias if bias is not None else gate, gate, h, slope))


@functools.lru_cache(maxsize=4096)
def _down_grad_plan(target, dout, weight, slope, dz, switched_off, precision):
    dout, weight, slope, dz = (Layout(*key) for key in (dout, weight, slope, dz))
    M, K = dout.shape
    N = weight.shape[1]
    cfg, (dout_block, w_block, dz_block), tma, programs = _matmul_plan(dout, weight, (dz,), M, N, target, False, 4,
                                                                       switched_off)
    scalars = (M, N, K, programs, *dout.strides, *weight.strides, *slope.strides, *dz.strides)
    return Plan(gated_down_grad_kernel, (programs,), (dout_block, w_block, None, dz_block), scalars,
                MappingProxyType(dict(USE_TMA=tma, PRECISION=precision, **cfg)))


def down_grad_launch(dout, weight, slope, dz, target):
    """dz = (dout @ weight) * slope, weight (K, N) as an nn.Linear(N, K) holds it."""
    plan = _down_grad_plan(target, layout_key(dout), layout_key(weight), layout_key(slope), layout_key(dz),
                           POINTERS_ONLY, _precision(dout.dtype))
    return plan.launch((dout, weight, slope, dz))


@dataclasses.dataclass
class Recording:
    target: Optional[Target]
    run: bool
    zeros: bool
    launches: list = dataclasses.field(default_factory=list)


_recordings = []  # the innermost record_launches block records


@contextlib.contextmanager
def record_launches(target=None, run=True, zeros=True):
    """Collect every Launch the ops make inside the block, planned for target (default: each tensor's own
    device): the GPU suite counts the binaries its steps compile this way, on any machine. run=False plans
    and records without launching, and the outputs are zeros, or left unwritten with zeros=False (for
    timing the host's part alone)."""
    recording = Recording(target, run, zeros)
    _recordings.append(recording)
    try:
        yield recording.launches
    finally:
        _recordings.remove(recording)


def _launch(make, args, outputs, device):
    """make(*args, target) -> Launch, launched for device and shown to the innermost recording
    (record_launches), which may leave it unlaunched: then its outputs are zeros, and whatever runs on
    them sees numbers."""
    if INTERPRET and device.type == "cpu" and (not _recordings or _recordings[-1].run):
        problem = interpreter_problem()
        if problem:
            raise InterpreterUnavailable(problem)
    if not _recordings:
        make(*args, target_of(device))()
        return
    recording = _recordings[-1]
    launch = make(*args, recording.target if recording.target is not None else target_of(device))
    recording.launches.append(launch)
    if not recording.run and recording.zeros:
        for out in outputs:
            if out is not None:
                out.zero_()
    elif recording.run:
        (launch if recording.target is None else make(*args, target_of(device)))()


def _up(x, weight, bias, gate, tanh, store_slope):
    """(h, the slope or None)."""
    M, N = x.shape[0], weight.shape[0]
    h = torch.empty((M, N), device=x.device, dtype=x.dtype)
    slope = torch.empty((M, N), device=x.device, dtype=x.dtype) if store_slope else None
    if M and N:
        _launch(up_launch, (x, weight, bias, gate, h, slope, tanh), (h, slope), x.device)
    return h, slope


def _tensor(slope, x):
    # a custom op returns tensors only: an empty one stands for "no slope"
    return slope if slope is not None else x.new_empty(0)


@torch.library.custom_op("abcgpt::gated_up", mutates_args=())
def gated_up(x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Tensor, tanh: bool,
             store_slope: bool) -> tuple[Tensor, Tensor]:
    h, slope = _up(x, weight, bias, gate, tanh, store_slope)
    return h, _tensor(slope, x)


@gated_up.register_fake
def _(x, weight, bias, gate, tanh, store_slope):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if store_slope else (0,))


@torch.library.custom_op("abcgpt::gated_down_grad", mutates_args=())
def gated_down_grad(dout: Tensor, weight: Tensor, slope: Tensor) -> Tensor:
    """dz = (dout @ W2) * slope, W2 of shape (K, N) as an nn.Linear(N, K) holds it."""
    dz = torch.empty((dout.shape[0], weight.shape[1]), device=dout.device, dtype=dout.dtype)
    if dz.numel():
        _launch(down_grad_launch, (dout, weight, slope, dz), (dz,), dout.device)
    return dz


@gated_down_grad.register_fake
def _(dout, weight, slope):
    return dout.new_empty((dout.shape[0], weight.shape[1]))


def _slope_of(ctx, op):
    if not ctx.store_slope:
        raise RuntimeError(f"{op} ran without keeping its slope (store_slope=False), so it has no backward")
    return ctx.saved_tensors[-1]


def _up_setup(ctx, inputs, output):
    x, weight, bias, gate, tanh, store_slope = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.has_bias, ctx.store_slope = bias is not None, store_slope


def _up_backward(ctx, dh, _):
    x, weight, _ = ctx.saved_tensors
    dz = dh * _slope_of(ctx, "gated_up")
    db = dz.sum(0) if ctx.has_bias else None
    return dz @ weight, dz.t() @ x, db, None, None, None


gated_up.register_autograd(_up_backward, setup_context=_up_setup)


def _eager(forward, setup_context, backward):
    """An autograd.Function of the same forward, setup and backward as a custom op's, for calls outside
    torch.compile: the custom op's dispatch costs several times the rest of the host path. forward takes ctx
    itself, since a Function with a setup_context binds its arguments by signature on every call."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.set_materialize_grads(False)  # no zero gradients made for the outputs a caller drops
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

    Eager.backward = staticmethod(backward)
    return Eager


_EagerUp = _eager(_up, _up_setup, _up_backward)


@torch.library.custom_op("abcgpt::gated_mlp", mutates_args=())
def gated_mlp_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], gate: Tensor,
                 tanh: bool, store_slope: bool) -> tuple[Tensor, Tensor, Tensor]:
    out, h, slope = _mlp(x, w1, b1, w2, b2, gate, tanh, store_slope)
    return out, h, _tensor(slope, x)


def _mlp(x, w1, b1, w2, b2, gate, tanh, store_slope):
    h, slope = _up(x, w1, b1, gate, tanh, store_slope)
    return F.linear(h, w2, b2), h, slope


@gated_mlp_op.register_fake
def _(x, w1, b1, w2, b2, gate, tanh, store_slope):
    hidden = (x.shape[0], w1.shape[0])
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty(hidden), x.new_empty(hidden if store_slope else (0,))


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, gate, tanh, store_slope = inputs
    _, h, slope = output
    ctx.save_for_backward(x, w1, w2, h, slope)
    ctx.has_b1, ctx.has_b2, ctx.store_slope = b1 is not None, b2 is not None, store_slope


def _mlp_backward(ctx, dout, _dh, _dslope):
    x, w1, w2, h, _ = ctx.saved_tensors
    slope = _slope_of(ctx, "gated_mlp_op")
    dout = dout.contiguous()
    dw2 = dout.t() @ h
    db2 = dout.sum(0) if ctx.has_b2 else None
    dz = gated_down_grad(dout, w2, slope)
    db1 = dz.sum(0) if ctx.has_b1 else None
    return dz @ w1, dz.t() @ x, db1, dw2, db2, None, None, None


gated_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)

_EagerMLP = _eager(_mlp, _mlp_setup, _mlp_backward)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _call(op, eager, forward, *args, grad):
    """The custom op where torch.compile traces (one opaque node); else the same forward directly, through
    autograd only when a gradient is wanted."""
    if torch.compiler.is_compiling():
        return op(*args, grad)
    return eager.apply(*args, grad) if grad else forward(*args, grad)


def _check(x, n_hidden, gate, approximate):
    """Shapes and options only: nothing that reads device memory (no host sync)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, features), got shape {tuple(x.shape)}")
    if approximate not in GELU_FORMS:
        raise ValueError(f"approximate must be one of {GELU_FORMS}, got {approximate!r}")
    if gate.shape[-1] != n_hidden or gate.dim() > 2:
        raise ValueError(f"gate must be ({n_hidden},) or (groups, {n_hidden}), got shape {tuple(gate.shape)}")
    if gate.dim() == 2 and (gate.shape[0] == 0 or x.shape[0] % gate.shape[0]):
        raise ValueError(f"a gate table of {gate.shape[0]} rows must divide x's {x.shape[0]} rows evenly")


def _gate_arg(gate):
    # float32 and unit stride along the hidden units, as the kernels index it
    return gate.float() if gate.stride(-1) == 1 else gate.float().contiguous()


def gated_linear_gelu(x, weight, bias, gate, approximate="none"):
    """GELU(x @ weight.T + bias) * gate in one kernel; x is (M, K), weight (N, K)."""
    _check(x, weight.shape[0], gate, approximate)
    h, _ = _call(gated_up, _EagerUp, _up, x, weight, bias, _gate_arg(gate), approximate == "tanh",
                 grad=_needs_grad(x, weight, bias))
    return h


def gated_mlp(x, w1, b1, w2, b2, gate, approximate="none"):
    """The gated MLP: (GELU(x @ w1.T + b1) * gate) @ w2.T + b2."""
    _check(x, w1.shape[0], gate, approximate)
    out, _, _ = _call(gated_mlp_op, _EagerMLP, _mlp, x, w1, b1, w2, b2, _gate_arg(gate), approximate == "tanh",
                      grad=_needs_grad(x, w1, b1, w2, b2))
    return out
