"""Triton kernels for the gated MLP (docs/design.md, section 3).

up:        h = GELU(x @ W1.T + b1) * G, and z = x @ W1.T + b1 when training;
down-grad: dz = (dout @ W2) * G * GELU'(z), the input gradient of the down-projection
           with the GELU and gate backward in its epilogue;
gate-grad: dz = dh * G * GELU'(z) as one elementwise pass, for the up-projection alone.

G holds precomputed gates: a vector over the hidden units for one alpha, or a
(B, N) table read as G[row // ROWS_PER_GATE] for one alpha per sequence. The
kernels never evaluate the tent themselves.

The two matmul kernels are persistent: a grid of at most one program per SM, each
walking its share of the output tiles, so one tile's epilogue overlaps the next
tile's loads. Operands come through TMA tensor descriptors where the hardware and
the strides allow (USE_TMA), else through masked pointer loads; both paths share
the tile order and the epilogue, which works on the fp32 accumulator in two
halves to keep register pressure down, then stores once.
"""
import triton
import triton.language as tl


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
def _load_gate(gate_ptr, rm, rn, M, N, stride_g, ROWS_PER_GATE, PER_ROW: tl.constexpr):
    """The gates of a tile: one row vector shared by every row, or G[row // ROWS_PER_GATE, col]."""
    if PER_ROW:
        group = (rm // ROWS_PER_GATE).to(tl.int64)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        return tl.load(gate_ptr + group[:, None] * stride_g + rn[None, :], mask=mask, other=0.0)
    else:
        return tl.load(gate_ptr + rn, mask=rn < N, other=0.0)[None, :]


@triton.jit
def _tile_origin(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row-tiles in turn share each column tile while it is in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_m
    pid_n = (tile % per_group) // group_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _accumulate(a, b, off_m, off_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                B_IS_NK: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 A[off_m:+BM, :] @ B[:, off_n:+BN]. With USE_TMA, a and b are descriptors (b's blocks
    are (BN, BK) when B_IS_NK, i.e. B is stored as an nn.Linear weight (N, K)); else pointers."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a_tile = a.load([off_m, k * BLOCK_K])
            if B_IS_NK:
                b_tile = b.load([off_n, k * BLOCK_K]).T
            else:
                b_tile = b.load([k * BLOCK_K, off_n])
            acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
    else:
        rm = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (off_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a + rm[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptrs = b + rk[:, None] * stride_bk + rn[None, :] * stride_bn
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a_tile = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
            b_tile = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The accumulator's left and right column halves."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _store(out, value, off_m, off_n, M, N, stride_m, stride_n, USE_TMA: tl.constexpr,
           BLOCK_M: tl.constexpr, HALF_N: tl.constexpr):
    """value (BLOCK_M, HALF_N) at out[off_m:, off_n:], clipped to (M, N)."""
    if USE_TMA:
        out.store([off_m, off_n], value.to(out.dtype))
    else:
        rm = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = off_n + tl.arange(0, HALF_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out + rm[:, None] * stride_m + rn[None, :] * stride_n, value.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _up_epilogue(z, off_m, off_n, M, N, b_ptr, gate_ptr, stride_g, ROWS_PER_GATE, h, z_out,
                 stride_hm, stride_hn, stride_zm, stride_zn,
                 HAS_BIAS: tl.constexpr, PER_ROW: tl.constexpr, STORE_Z: tl.constexpr, TANH: tl.constexpr,
                 USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, HALF_N: tl.constexpr):
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, HALF_N)
    if HAS_BIAS:
        z += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    gate = _load_gate(gate_ptr, rm, rn, M, N, stride_g, ROWS_PER_GATE, PER_ROW)
    _store(h, _gelu(z, TANH) * gate, off_m, off_n, M, N, stride_hm, stride_hn, USE_TMA, BLOCK_M, HALF_N)
    if STORE_Z:
        _store(z_out, z, off_m, off_n, M, N, stride_zm, stride_zn, USE_TMA, BLOCK_M, HALF_N)


@triton.jit
def gated_up_kernel(
    x, w, b_ptr, gate_ptr, h, z_out,
    M, N, K, ROWS_PER_GATE,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_g, stride_hm, stride_hn, stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr, PER_ROW: tl.constexpr, STORE_Z: tl.constexpr, TANH: tl.constexpr,
    USE_TMA: tl.constexpr, PRECISION: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """h = GELU(x @ W.T + b) * G; z = x @ W.T + b if STORE_Z. W is (N, K) as in nn.Linear."""
    HALF_N: tl.constexpr = BLOCK_N // 2
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
        off_m, off_n = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _accumulate(x, w, off_m, off_n, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn,
                          True, USE_TMA, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        left, right = _halves(acc, BLOCK_M, BLOCK_N)
        _up_epilogue(left, off_m, off_n, M, N, b_ptr, gate_ptr, stride_g, ROWS_PER_GATE, h, z_out,
                     stride_hm, stride_hn, stride_zm, stride_zn,
                     HAS_BIAS, PER_ROW, STORE_Z, TANH, USE_TMA, BLOCK_M, HALF_N)
        _up_epilogue(right, off_m, off_n + HALF_N, M, N, b_ptr, gate_ptr, stride_g, ROWS_PER_GATE, h, z_out,
                     stride_hm, stride_hn, stride_zm, stride_zn,
                     HAS_BIAS, PER_ROW, STORE_Z, TANH, USE_TMA, BLOCK_M, HALF_N)


@triton.jit
def _down_grad_epilogue(dh, off_m, off_n, M, N, z_in, gate_ptr, stride_g, ROWS_PER_GATE, dz,
                        stride_zm, stride_zn, stride_dm, stride_dn,
                        PER_ROW: tl.constexpr, TANH: tl.constexpr, USE_TMA: tl.constexpr,
                        BLOCK_M: tl.constexpr, HALF_N: tl.constexpr):
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, HALF_N)
    if USE_TMA:
        z = z_in.load([off_m, off_n]).to(tl.float32)
    else:
        rm64 = rm.to(tl.int64)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        z = tl.load(z_in + rm64[:, None] * stride_zm + rn[None, :] * stride_zn, mask=mask, other=0.0).to(tl.float32)
    gate = _load_gate(gate_ptr, rm, rn, M, N, stride_g, ROWS_PER_GATE, PER_ROW)
    _store(dz, dh * gate * _gelu_grad(z, TANH), off_m, off_n, M, N, stride_dm, stride_dn, USE_TMA, BLOCK_M, HALF_N)


@triton.jit
def gated_down_grad_kernel(
    dout, w, z_in, gate_ptr, dz,
    M, N, K, ROWS_PER_GATE,
    stride_om, stride_ok, stride_wk, stride_wn, stride_g, stride_zm, stride_zn, stride_dm, stride_dn,
    PER_ROW: tl.constexpr, TANH: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dz = (dout @ W2) * G * GELU'(z). dout is (M, K); W2 is (K, N) as nn.Linear(N, K) holds it."""
    HALF_N: tl.constexpr = BLOCK_N // 2
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
        off_m, off_n = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _accumulate(dout, w, off_m, off_n, M, N, K, stride_om, stride_ok, stride_wk, stride_wn,
                          False, USE_TMA, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        left, right = _halves(acc, BLOCK_M, BLOCK_N)
        _down_grad_epilogue(left, off_m, off_n, M, N, z_in, gate_ptr, stride_g, ROWS_PER_GATE, dz,
                            stride_zm, stride_zn, stride_dm, stride_dn, PER_ROW, TANH, USE_TMA, BLOCK_M, HALF_N)
        _down_grad_epilogue(right, off_m, off_n + HALF_N, M, N, z_in, gate_ptr, stride_g, ROWS_PER_GATE, dz,
                            stride_zm, stride_zn, stride_dm, stride_dn, PER_ROW, TANH, USE_TMA, BLOCK_M, HALF_N)


@triton.jit
def gate_grad_kernel(
    dh_ptr, z_ptr, gate_ptr, dz_ptr, M, N, ROWS_PER_GATE,
    stride_hm, stride_hn, stride_zm, stride_zn, stride_g, stride_dm, stride_dn,
    PER_ROW: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dz = dh * G * GELU'(z), elementwise over an (M, N) grid of tiles."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    dh = tl.load(dh_ptr + rm64[:, None] * stride_hm + rn[None, :] * stride_hn, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rm64[:, None] * stride_zm + rn[None, :] * stride_zn, mask=mask, other=0.0).to(tl.float32)
    gate = _load_gate(gate_ptr, rm, rn, M, N, stride_g, ROWS_PER_GATE, PER_ROW)
    dz = dh * gate * _gelu_grad(z, TANH)
    tl.store(dz_ptr + rm64[:, None] * stride_dm + rn[None, :] * stride_dn, dz.to(dz_ptr.dtype.element_ty), mask=mask)
