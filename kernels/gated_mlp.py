"""Triton kernels for the gated MLP (docs/design.md, section 3).

up:        h = GELU(z) * G with z = x @ W1.T + b1, and when training the slope
           dh/dz = GELU'(z) * G, from the same exp2 and reciprocal as h;
down-grad: dz = (dout @ W2) * slope, the input gradient of the down-projection
           with the GELU and gate backward in its epilogue: one multiply.

G holds precomputed gates, loaded as GATE says: "vector", one gate per hidden unit for
one alpha; "tile", a (B, N) table of one row per sequence whose sequences are whole
multiples of BLOCK_M, so that a tile reads one row of it; "row", the same table read
as G[row // ROWS_PER_GATE] row by row (any sequence length). The kernels never
evaluate the tent themselves.

The matmul kernels are persistent, each program walking its share of the output
tiles, and each hides its epilogue under wgmma one of two ways (docs/design.md,
Overlap). The forward on the TMA path (gated_up_deferred_kernel) defers a tile's
epilogue into the next tile's K loop, a chunk under each of its first wgmma, one
program per SM. The other launches (gated_up_kernel, gated_down_grad_kernel) run up
to two programs per SM, so that one program's epilogue can run while the other's
wgmma keeps the tensor cores busy; their loop nests are flattened, so that the next
tile's first loads are in flight under a tile's epilogue. Operands come through TMA
tensor descriptors where the hardware and the strides allow (USE_TMA), else through
masked pointer loads; both paths share the tile order and the epilogue, which works on the fp32
accumulator in column chunks to keep register pressure down.

GELU for 16-bit outputs (FAST_GELU) is z * sigmoid(p(z)) with sigmoid(y) = 1 / (1 + 2^-y):
for the tanh form that is its own formula exactly, and for the erf form p is the
polynomial below, within the accuracy contract of docs/design.md (section 3). Its
2^x and 1/x run on the GPU's special-function unit (ASM: ex2.approx and
rcp.approx), in the interpreter as plain float32 math. float32 outputs keep the
exact erf.
"""
import triton
import triton.language as tl

# p(z) = z * (Q0 + Q1 t + Q2 t^2), t = min(z^2, 36): a minimax fit of log2(Phi / (1 - Phi)), joint with
# its derivative; past |z| = 6 p grows linearly, where the sigmoid is 0 or 1 in float32 anyway
ERF_Q0 = tl.constexpr(2.3000950131866693)
ERF_Q1 = tl.constexpr(0.10708386012095325)
ERF_Q2 = tl.constexpr(-0.0010156014269278877)
# the tanh form: 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2 / pi) (z + 0.044715 z^3), in base 2
TANH_Q0 = tl.constexpr(2.302208198144325)  # 2 sqrt(2 / pi) / ln 2
TANH_Q1 = tl.constexpr(0.10294324353515993)  # TANH_Q0 * 0.044715
T_MAX = tl.constexpr(36.0)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _exp2(x, ASM: tl.constexpr):
    if ASM:  # one MUFU.EX2; denormal results flush to zero, which a sigmoid's tail can spare
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _reciprocal(x, ASM: tl.constexpr):
    if ASM:  # one MUFU.RCP: within 1 ulp, against about ten instructions for an IEEE division
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _sigmoid_of_logit(z, TANH: tl.constexpr, ASM: tl.constexpr):
    """(s, t): s = sigmoid(p(z)) ~ Phi(z), and t = min(z^2, 36). 2^-p overflows to inf far below zero,
    where s is then 0 as it should be."""
    t = tl.minimum(z * z, T_MAX)
    if TANH:
        q = TANH_Q0 + TANH_Q1 * t
    else:
        q = ERF_Q0 + (ERF_Q1 + ERF_Q2 * t) * t
    return _reciprocal(1.0 + _exp2(-z * q, ASM), ASM), t


@triton.jit
def _gelu(z, TANH: tl.constexpr, FAST: tl.constexpr, ASM: tl.constexpr):
    if FAST or TANH:
        s, _ = _sigmoid_of_logit(z, TANH, ASM)
        return z * s
    else:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_and_slope(z, TANH: tl.constexpr, FAST: tl.constexpr, ASM: tl.constexpr):
    """GELU(z) and its derivative GELU'(z), from one exp2 and one reciprocal."""
    if FAST or TANH:
        # d/dz z s(p) = s + z s (1 - s) p' ln 2 = s (1 + z (1 - s) p' ln 2)
        s, t = _sigmoid_of_logit(z, TANH, ASM)
        if TANH:
            dp = (TANH_Q0 * LN2) + (3.0 * TANH_Q1 * LN2) * t
        else:
            dp = (ERF_Q0 * LN2) + ((3.0 * ERF_Q1 * LN2) + (5.0 * ERF_Q2 * LN2) * t) * t
        return z * s, s * (1.0 + (z * (1.0 - s)) * dp)
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        return z * cdf, cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


@triton.jit
def _load_gate(gate_ptr, rm, rn, off_m, M, N, stride_g, ROWS_PER_GATE, GATE: tl.constexpr):
    """The gates of a tile, as GATE says (see the module's docstring); with GATE "loaded", gate_ptr holds the
    gates themselves, loaded ahead (gated_up_deferred_kernel)."""
    if GATE == "loaded":
        return gate_ptr
    elif GATE == "row":
        group = (rm // ROWS_PER_GATE).to(tl.int64)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        return tl.load(gate_ptr + group[:, None] * stride_g + rn[None, :], mask=mask, other=0.0)
    else:
        if GATE == "tile":  # every row of the tile is in one sequence
            gate_ptr += (off_m // ROWS_PER_GATE).to(tl.int64) * stride_g
        return tl.load(gate_ptr + rn, mask=rn < N, other=0.0)[None, :]


@triton.jit
def _settled(x, ASM: tl.constexpr):
    """x through an opaque move the compiler cannot see through: what computes x stays where it is written,
    neither sunk into later branches (loads reloaded in each) nor hoisted out of the K loop (math that no
    wgmma then hides)."""
    if ASM:
        return tl.inline_asm_elementwise("mov.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=False, pack=1)
    else:
        return x


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
def _load_chunk(src, off_m, off_n, M, N, stride_m, stride_n, USE_TMA: tl.constexpr,
                BLOCK_M: tl.constexpr, CHUNK_N: tl.constexpr):
    """src[off_m:+BLOCK_M, off_n:+CHUNK_N], zero outside (M, N)."""
    if USE_TMA:
        return src.load([off_m, off_n])
    else:
        rm = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = off_n + tl.arange(0, CHUNK_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        return tl.load(src + rm[:, None] * stride_m + rn[None, :] * stride_n, mask=mask, other=0.0)


@triton.jit
def _store(out, value, off_m, off_n, M, N, stride_m, stride_n, USE_TMA: tl.constexpr,
           BLOCK_M: tl.constexpr, CHUNK_N: tl.constexpr):
    """value (BLOCK_M, CHUNK_N) at out[off_m:, off_n:], clipped to (M, N)."""
    if USE_TMA:
        out.store([off_m, off_n], value.to(out.dtype))
    else:
        rm = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = off_n + tl.arange(0, CHUNK_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(out + rm[:, None] * stride_m + rn[None, :] * stride_n, value.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _up_epilogue(z, off_m, off_n, M, N, b_ptr, gate_ptr, stride_g, ROWS_PER_GATE, h, slope,
                 stride_hm, stride_hn, stride_sm, stride_sn,
                 HAS_BIAS: tl.constexpr, GATE: tl.constexpr, STORE_SLOPE: tl.constexpr, TANH: tl.constexpr,
                 FAST_GELU: tl.constexpr, ASM: tl.constexpr, USE_TMA: tl.constexpr,
                 BLOCK_M: tl.constexpr, CHUNK_N: tl.constexpr):
    """h and, with STORE_SLOPE, the slope of the columns [off_n, off_n + CHUNK_N) of a tile."""
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, CHUNK_N)
    if HAS_BIAS:
        z += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    gate = _load_gate(gate_ptr, rm, rn, off_m, M, N, stride_g, ROWS_PER_GATE, GATE)
    if STORE_SLOPE:
        value, dvalue = _gelu_and_slope(z, TANH, FAST_GELU, ASM)
        # through pointers: a TMA store would share h's staging buffer, and the two would wait on each other
        _store(slope, dvalue * gate, off_m, off_n, M, N, stride_sm, stride_sn, False, BLOCK_M, CHUNK_N)
    else:
        value = _gelu(z, TANH, FAST_GELU, ASM)
    _store(h, value * gate, off_m, off_n, M, N, stride_hm, stride_hn, USE_TMA, BLOCK_M, CHUNK_N)


@triton.jit
def _up_epilogue_half(z, off_m, off_n, M, N, b_ptr, gate_ptr, stride_g, ROWS_PER_GATE, h, slope,
                      stride_hm, stride_hn, stride_sm, stride_sn,
                      HAS_BIAS: tl.constexpr, GATE: tl.constexpr, STORE_SLOPE: tl.constexpr, TANH: tl.constexpr,
                      FAST_GELU: tl.constexpr, ASM: tl.constexpr, USE_TMA: tl.constexpr,
                      BLOCK_M: tl.constexpr, HALF_N: tl.constexpr):
    """A half tile's epilogue; with STORE_SLOPE in two quarters, as the slope needs more registers."""
    if STORE_SLOPE:
        first, second = _halves(z, BLOCK_M, HALF_N)
        _up_epilogue(first, off_m, off_n, M, N, b_ptr, gate_ptr, stride_g, ROWS_PER_GATE, h, slope,
                     stride_hm, stride_hn, stride_sm, stride_sn,
                     HAS_BIAS, GATE, STORE_SLOPE, TANH, FAST_GELU, ASM, USE_TMA, BLOCK_M, HALF_N // 2)
        _up_epilogue(second, off_m, off_n + HALF_N // 2, M, N, b_ptr, gate_ptr, stride_g, ROWS_PER_GATE, h, slope,
                     stride_hm, stride_hn, stride_sm, stride_sn,
                     HAS_BIAS, GATE, STORE_SLOPE, TANH, FAST_GELU, ASM, USE_TMA, BLOCK_M, HALF_N // 2)
    else:
        _up_epilogue(z, off_m, off_n, M, N, b_ptr, gate_ptr, stride_g, ROWS_PER_GATE, h, slope,
                     stride_hm, stride_hn, stride_sm, stride_sn,
                     HAS_BIAS, GATE, STORE_SLOPE, TANH, FAST_GELU, ASM, USE_TMA, BLOCK_M, HALF_N)


@triton.jit(do_not_specialize=["M", "num_programs"])
def gated_up_kernel(
    x, w, b_ptr, gate_ptr, h, slope,
    M, N, K, ROWS_PER_GATE, num_programs,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_g, stride_hm, stride_hn, stride_sm, stride_sn,
    HAS_BIAS: tl.constexpr, GATE: tl.constexpr, STORE_SLOPE: tl.constexpr, TANH: tl.constexpr,
    FAST_GELU: tl.constexpr, ASM: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """h = GELU(z) * G with z = x @ W.T + b, and the slope dh/dz = GELU'(z) * G if STORE_SLOPE.
    W is (N, K) as in nn.Linear. With TMA, h's descriptor has blocks of BLOCK_N // 2 columns, BLOCK_N // 4
    with STORE_SLOPE (up_launch); the slope is always a pointer."""
    HALF_N: tl.constexpr = BLOCK_N // 2
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    # flattened into one loop over all K steps: the pipeline's loads run ahead into the next tile while this
    # tile's epilogue runs, instead of draining and refilling at every tile (bench.kernel_static checks)
    for tile in tl.range(tl.program_id(0), tiles, num_programs, flatten=True):
        off_m, off_n = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _accumulate(x, w, off_m, off_n, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn,
                          True, USE_TMA, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        left, right = _halves(acc, BLOCK_M, BLOCK_N)
        _up_epilogue_half(left, off_m, off_n, M, N, b_ptr, gate_ptr, stride_g, ROWS_PER_GATE, h, slope,
                          stride_hm, stride_hn, stride_sm, stride_sn,
                          HAS_BIAS, GATE, STORE_SLOPE, TANH, FAST_GELU, ASM, USE_TMA, BLOCK_M, HALF_N)
        _up_epilogue_half(right, off_m, off_n + HALF_N, M, N, b_ptr, gate_ptr, stride_g, ROWS_PER_GATE, h, slope,
                          stride_hm, stride_hn, stride_sm, stride_sn,
                          HAS_BIAS, GATE, STORE_SLOPE, TANH, FAST_GELU, ASM, USE_TMA, BLOCK_M, HALF_N)


@triton.jit
def _chunk_epilogue(acc, gates, chunk: tl.constexpr, off_m, off_n, M, N, b_ptr, gate_ptr, stride_g, ROWS_PER_GATE, h,
                    slope, stride_sm, stride_sn,
                    HAS_BIAS: tl.constexpr, GATE: tl.constexpr, STORE_SLOPE: tl.constexpr, TANH: tl.constexpr,
                    FAST_GELU: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    LEVELS: tl.constexpr, IN_LOOP: tl.constexpr):
    """h, and with STORE_SLOPE the slope, for the columns [chunk, chunk + 1) * BLOCK_N / 2^LEVELS of the tile
    whose accumulator is acc and whose (1, BLOCK_N) gates are gates, unless GATE is "row": then the chunk
    loads its gate rows itself."""
    CHUNK_N: tl.constexpr = BLOCK_N >> LEVELS
    z = acc
    for level in tl.static_range(LEVELS):  # halve the columns, keeping the half that holds the chunk
        left, right = _halves(z, BLOCK_M, BLOCK_N >> level)
        z = left if (chunk >> (LEVELS - 1 - level)) % 2 == 0 else right
        if GATE != "row":
            left, right = _halves(gates, 1, BLOCK_N >> level)
            gates = left if (chunk >> (LEVELS - 1 - level)) % 2 == 0 else right
    if IN_LOOP:  # else the compiler hoists the chunk's math, loop-invariant, out of the K loop
        z = _settled(z, ASM)
    if GATE == "row":
        _up_epilogue(z, off_m, off_n + chunk * CHUNK_N, M, N, b_ptr, gate_ptr, stride_g, ROWS_PER_GATE, h, slope,
                     0, 0, stride_sm, stride_sn, HAS_BIAS, GATE, STORE_SLOPE, TANH, FAST_GELU, ASM, True, BLOCK_M,
                     CHUNK_N)
    else:
        _up_epilogue(z, off_m, off_n + chunk * CHUNK_N, M, N, b_ptr, gates, stride_g, ROWS_PER_GATE, h, slope,
                     0, 0, stride_sm, stride_sn, HAS_BIAS, "loaded", STORE_SLOPE, TANH, FAST_GELU, ASM, True, BLOCK_M,
                     CHUNK_N)


@triton.jit(do_not_specialize=["M", "num_programs"])
def gated_up_deferred_kernel(
    x, w, b_ptr, gate_ptr, h, slope,
    M, N, K, ROWS_PER_GATE, num_programs,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_g, stride_hm, stride_hn, stride_sm, stride_sn,
    HAS_BIAS: tl.constexpr, GATE: tl.constexpr, STORE_SLOPE: tl.constexpr, TANH: tl.constexpr,
    FAST_GELU: tl.constexpr, ASM: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    LEVELS: tl.constexpr, IN_LOOP: tl.constexpr = True,
):
    """h = GELU(z) * G, and the slope if STORE_SLOPE, as gated_up_kernel computes them, with its arguments
    (TMA), one program per SM: the forward, and the training forward that the kernel benchmark weighs
    against gated_up_kernel's two programs per SM. It keeps a tile's accumulator through the next tile's K
    loop and finishes one chunk of it (BLOCK_N / 2^LEVELS columns; h's descriptor blocks are as wide) after
    each of that loop's first 2^LEVELS wgmma issues, so the chunk runs while the wgmma does. IN_LOOP=False
    lets the compiler hoist the chunks' math out of the K loop, for the test of that guard.
    Its loop nest stays: flattened (by Triton or by hand), the kept accumulator is a loop-carried value
    derived from the wgmma's, and Triton's pipeline then waits for every wgmma (docs/design.md, Overlap)."""
    CHUNKS: tl.constexpr = 1 << LEVELS
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    steps = tl.cdiv(K, BLOCK_K)
    kept = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the previous tile's accumulator, once there is one
    kept_m = 0
    kept_n = 0
    kept_gates = tl.zeros((1, BLOCK_N), dtype=tl.float32)  # its gates, but for a row table's
    for tile in range(tl.program_id(0), tiles, num_programs):
        off_m, off_n = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if GATE != "row":  # this tile's gates, before its K loop: they arrive under it, for the next one's chunks
            gates = _load_gate(gate_ptr, 0, off_n + tl.arange(0, BLOCK_N), off_m, M, N, stride_g, ROWS_PER_GATE,
                               GATE)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, steps):
            acc = tl.dot(x.load([off_m, k * BLOCK_K]), w.load([off_n, k * BLOCK_K]).T, acc,
                         input_precision=PRECISION)
            if tile != tl.program_id(0):
                for chunk in tl.static_range(CHUNKS):
                    if k == chunk:
                        _chunk_epilogue(kept, kept_gates, chunk, kept_m, kept_n, M, N, b_ptr, gate_ptr, stride_g,
                                        ROWS_PER_GATE, h, slope, stride_sm, stride_sn, HAS_BIAS, GATE,
                                        STORE_SLOPE, TANH, FAST_GELU, ASM, BLOCK_M, BLOCK_N, LEVELS, IN_LOOP)
        if tile != tl.program_id(0):  # chunks a short K loop had no step for
            for chunk in tl.static_range(CHUNKS):
                if steps <= chunk:
                    _chunk_epilogue(kept, kept_gates, chunk, kept_m, kept_n, M, N, b_ptr, gate_ptr, stride_g,
                                    ROWS_PER_GATE, h, slope, stride_sm, stride_sn, HAS_BIAS, GATE, STORE_SLOPE,
                                    TANH, FAST_GELU, ASM, BLOCK_M, BLOCK_N, LEVELS, IN_LOOP)
        kept = acc
        kept_m = off_m
        kept_n = off_n
        if GATE != "row":
            kept_gates = _settled(gates, ASM)
    if tl.program_id(0) < tiles:  # the last tile's epilogue has no next K loop
        for chunk in tl.static_range(CHUNKS):
            _chunk_epilogue(kept, kept_gates, chunk, kept_m, kept_n, M, N, b_ptr, gate_ptr, stride_g,
                            ROWS_PER_GATE, h, slope, stride_sm, stride_sn, HAS_BIAS, GATE, STORE_SLOPE, TANH,
                            FAST_GELU, ASM, BLOCK_M, BLOCK_N, LEVELS, IN_LOOP)


@triton.jit(do_not_specialize=["M", "num_programs"])
def gated_down_grad_kernel(
    dout, w, slope, dz,
    M, N, K, num_programs,
    stride_om, stride_ok, stride_wk, stride_wn, stride_sm, stride_sn, stride_dm, stride_dn,
    USE_TMA: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dz = (dout @ W2) * slope, the slope the forward stored. dout is (M, K); W2 is (K, N) as
    nn.Linear(N, K) holds it. With TMA, dz's descriptor has blocks of BLOCK_N // 4 columns."""
    HALF_N: tl.constexpr = BLOCK_N // 2
    QUARTER_N: tl.constexpr = BLOCK_N // 4
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    # flattened as gated_up_kernel is, on the TMA path: with pointer loads the flattened loop waits for every
    # wgmma before the next (in the sm_90a code), which costs more than the refill it saves
    for tile in tl.range(tl.program_id(0), tiles, num_programs, flatten=USE_TMA):
        off_m, off_n = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _accumulate(dout, w, off_m, off_n, M, N, K, stride_om, stride_ok, stride_wk, stride_wn,
                          False, USE_TMA, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        # in quarters, the slope loaded just before its use: loaded ahead, it stayed live across the flattened
        # loop and spilled, and a half's staging kept two programs from fitting an SM's shared memory
        left, right = _halves(acc, BLOCK_M, BLOCK_N)
        for half in tl.static_range(2):
            first, second = _halves(left if half == 0 else right, BLOCK_M, HALF_N)
            for quarter in tl.static_range(2):
                off = off_n + half * HALF_N + quarter * QUARTER_N
                s = _load_chunk(slope, off_m, off, M, N, stride_sm, stride_sn, False, BLOCK_M, QUARTER_N)
                _store(dz, (first if quarter == 0 else second) * s.to(tl.float32), off_m, off, M, N, stride_dm,
                       stride_dn, USE_TMA, BLOCK_M, QUARTER_N)
