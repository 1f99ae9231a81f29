"""Triton kernels for the gated MLP (DESIGN.md section 3).

up:        h = GELU(x @ W1.T + b1) * g(alpha, m), and z = x @ W1.T + b1 when training;
down-grad: dz = (dout @ W2) * g(alpha, m) * GELU'(z), the input gradient of the
           down-projection with the GELU and gate backward folded into its epilogue;
gate-grad: dz = dh * g(alpha, m) * GELU'(z) as one elementwise pass, for the
           up-projection used on its own.

Both matmuls accumulate in fp32 and apply their epilogue to the accumulator
before the single store. alpha is one value (a per-column gate vector, computed
once per tile) or one value per row.
"""
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if INTERPRET:  # one small config: the interpreter is slow and benchmarks nothing
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4})]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 256, 64, 8, 3),  # large tiles: Hopper (228 KB shared memory) and A100
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 32, 4, 4),  # small tiles: consumer Ampere (100 KB) and small M
        (32, 64, 32, 4, 5),
        (16, 64, 64, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def m_bucket(m):
    """Autotune key for M: its power of two, so new batch shapes in one bucket reuse the tuning."""
    return min(triton.next_power_of_2(max(int(m), 1)), 1 << 20)


@triton.jit
def _tent_gate(alpha, m, narrowness):
    reach = narrowness * tl.maximum(m, 1.0 - m)
    d = tl.minimum(tl.abs(alpha - m) / reach, 1.0)
    s = tl.sin(1.5707963267948966 * (1.0 - d))  # cos^2(pi/2 d) as sin^2(pi/2 (1 - d)): exactly 0 at d = 1
    return s * s


@triton.jit
def _tanh(u):
    # through exp: the interpreter has no libdevice tanh; exp overflow to inf still gives +-1
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu(z, TANH: tl.constexpr):
    if TANH:
        return 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    else:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z, TANH: tl.constexpr):
    if TANH:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        du = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


@triton.jit
def _gate_tile(alpha_ptr, m_ptr, rm, rn, M, N, narrowness, PER_ROW_ALPHA: tl.constexpr):
    m = tl.load(m_ptr + rn, mask=rn < N, other=0.5).to(tl.float32)
    if PER_ROW_ALPHA:
        alpha = tl.load(alpha_ptr + rm, mask=rm < M, other=0.0).to(tl.float32)
        return _tent_gate(alpha[:, None], m[None, :], narrowness)
    else:
        alpha = tl.load(alpha_ptr).to(tl.float32)
        return _tent_gate(alpha, m, narrowness)[None, :]  # one gate vector for the whole tile


@triton.jit
def _tile_indices(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row-tiles share their column tiles in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _matmul_tile(a_ptr, b_ptr, rm, rn, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 accumulator of A[rm, :] @ B[:, rn], tails masked."""
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "PER_ROW_ALPHA", "STORE_Z"])
@triton.jit
def gated_up_kernel(
    x_ptr, w_ptr, b_ptr, alpha_ptr, m_ptr, h_ptr, z_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hn, stride_zm, stride_zn,
    narrowness,
    HAS_BIAS: tl.constexpr, PER_ROW_ALPHA: tl.constexpr, STORE_Z: tl.constexpr, TANH: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """h = GELU(x @ W.T + b) * g(alpha, m); z = x @ W.T + b if STORE_Z. W is (N, K) as in nn.Linear."""
    rm, rn = _tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    z = _matmul_tile(x_ptr, w_ptr, rm, rn, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn,
                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    if HAS_BIAS:
        z += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    h = _gelu(z, TANH) * _gate_tile(alpha_ptr, m_ptr, rm, rn, M, N, narrowness, PER_ROW_ALPHA)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(h_ptr + rm[:, None] * stride_hm + rn[None, :] * stride_hn, h.to(h_ptr.dtype.element_ty), mask=mask)
    if STORE_Z:
        tl.store(z_ptr + rm[:, None] * stride_zm + rn[None, :] * stride_zn, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "PER_ROW_ALPHA"])
@triton.jit
def gated_down_grad_kernel(
    dout_ptr, w_ptr, z_ptr, alpha_ptr, m_ptr, dz_ptr,
    M, N, K, M_BUCKET,
    stride_om, stride_ok, stride_wk, stride_wn, stride_zm, stride_zn, stride_dm, stride_dn,
    narrowness,
    PER_ROW_ALPHA: tl.constexpr, TANH: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dz = (dout @ W2) * g(alpha, m) * GELU'(z). dout is (M, K), W2 is (K, N) as in nn.Linear(N, K)."""
    rm, rn = _tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dh = _matmul_tile(dout_ptr, w_ptr, rm, rn, M, N, K, stride_om, stride_ok, stride_wk, stride_wn,
                      BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    z = tl.load(z_ptr + rm[:, None] * stride_zm + rn[None, :] * stride_zn, mask=mask, other=0.0).to(tl.float32)
    dz = dh * _gate_tile(alpha_ptr, m_ptr, rm, rn, M, N, narrowness, PER_ROW_ALPHA) * _gelu_grad(z, TANH)
    tl.store(dz_ptr + rm[:, None] * stride_dm + rn[None, :] * stride_dn, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gate_grad_kernel(
    dh_ptr, z_ptr, alpha_ptr, m_ptr, dz_ptr, M, N,
    stride_hm, stride_hn, stride_zm, stride_zn, stride_dm, stride_dn,
    narrowness,
    PER_ROW_ALPHA: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dz = dh * g(alpha, m) * GELU'(z), elementwise over an (M, N) grid of tiles."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    dh = tl.load(dh_ptr + rm[:, None] * stride_hm + rn[None, :] * stride_hn, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rm[:, None] * stride_zm + rn[None, :] * stride_zn, mask=mask, other=0.0).to(tl.float32)
    dz = dh * _gate_tile(alpha_ptr, m_ptr, rm, rn, M, N, narrowness, PER_ROW_ALPHA) * _gelu_grad(z, TANH)
    tl.store(dz_ptr + rm[:, None] * stride_dm + rn[None, :] * stride_dn, dz.to(dz_ptr.dtype.element_ty), mask=mask)
