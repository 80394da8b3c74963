"""flash_attn.py: FlashAttention-2, forward and backward, as Triton kernels beside a plain-PyTorch twin.

The idea: attention's N x N score matrix never needs to exist. Cut Q into query tiles and K, V into key tiles
small enough for on-chip memory; for one query tile, stream the key tiles past it and keep a running row max m
and row sum l (the online softmax), rescaling the partial output whenever m grows. Only O and one number per row,
the logsumexp L = m + log l, go back to HBM. The backward recomputes each probability tile from Q, K and L
instead of reading a stored P.

    forward   S = scale Q K^T,  P = exp(S - L),  O = P V                       4 B H N^2 D FLOPs (half if causal)
    backward  Delta = rowsum(dO * O),  dV = P^T dO,  dP = dO V^T,
              dS = P * (dP - Delta),  dQ = scale dS K,  dK = scale dS^T Q        2.5x the forward
              (5 matmuls to the forward's 2; these kernels do 7: the dQ pass recomputes S and dP, see below)
    memory    O(B H N D) for O, L and the gradients, against O(B H N^2) for naive attention

The twin (first half of the file) is the lecture's pseudo-code, FlashAttention-2's Algorithms 1 and 2, in
PyTorch; the Triton kernels (second half) are the same loops with one program instance per outer iteration:
    twin_forward, outer loop over query tiles i   ->  _fwd_kernel, one program per (query tile, batch, head)
    twin_backward, Delta = rowsum(dO * O)         ->  _bwd_delta_kernel
    twin_backward, outer loop over key tiles j    ->  _bwd_dkdv_kernel, one program per (key tile, batch, KV head);
                                                      it also loops over the query heads sharing that KV head (GQA)
    twin_backward's  dQ_i += scale dS K_j         ->  _bwd_dq_kernel, a second pass over query tiles: each dQ tile
                                                      has one owner, so no atomic adds (FlashAttention-2 uses them)
The kernels add what the GPU rewards: exp2 with log2(e) folded into the scale; causal key tiles above the
diagonal never visited, tiles below it run without any mask, only the diagonal (and a ragged last tile) masks;
the longest causal query tiles launch first; tile sizes autotuned for Hopper.

Where it runs: CUDA tensors use the kernels (fp16, bf16; fp32 with tf32 dots, or exact
fp32 ones while torch.get_float32_matmul_precision() is "highest"). CPU tensors use the Triton
interpreter when TRITON_INTERPRET=1 was set before this file was imported (fp32, fp16), otherwise the twin (any
float dtype, float64 included). Head dims 16 to 128; grouped-query attention with H % H_kv == 0.

Run: `python flash_attn.py`: on a GPU, a bf16 check against SDPA, then TFLOP/s of ours against SDPA's flash and
cuDNN backends and peak memory against naive attention; on a CPU, a float64 correctness demo of the twin.
"""
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton read it at import; so do we
TWIN_BLOCK = 32        # the twin's tile size (rows of Q and of K per tile)
HEAD_DIMS = (16, 128)  # the smallest and largest supported head dim


# ------------------------------------------------------------------------------ the twin, in plain PyTorch
def twin_forward(q, k, v, causal, scale, block=None):
    """Algorithm 1 (forward): returns O and the logsumexp L of each row, nothing of size N x N."""
    B, H, N, D = q.shape
    block = block or TWIN_BLOCK
    acc_t = torch.promote_types(q.dtype, torch.float32)  # 16-bit inputs, fp32 arithmetic: as the kernels do
    k, v = (t.repeat_interleave(H // t.shape[1], dim=1).to(acc_t) for t in (k, v))  # head h reads KV h // group
    o, lse = torch.empty_like(q), torch.empty(B, H, N, dtype=acc_t, device=q.device)
    for i in range(0, N, block):                                  # outer loop: query tile Q_i
        qi = q[:, :, i:i + block].to(acc_t)
        m = torch.full(qi.shape[:-1], -math.inf, dtype=acc_t, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(qi)
        for j in range(0, i + 1 if causal else N, block):         # inner loop: key tiles; causal stops at i
            s = scale * qi @ k[:, :, j:j + block].transpose(-2, -1)
            if causal and j == i:                                 # only the diagonal tile has masked entries
                rows, cols = (torch.arange(a, a + n, device=q.device) for a, n in zip((i, j), s.shape[-2:]))
                s = s.masked_fill(cols[None, :] > rows[:, None], -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new[..., None])
            alpha = torch.exp(m - m_new)                          # rescales what was summed under the old max
            l = alpha * l + p.sum(-1)
            acc = alpha[..., None] * acc + p @ v[:, :, j:j + block]
            m = m_new
        o[:, :, i:i + block] = (acc / l[..., None]).to(q.dtype)
        lse[:, :, i:i + block] = m + torch.log(l)
    return o, lse


def twin_backward(q, k, v, o, lse, do, causal, scale, block=None):
    """Algorithm 2 (backward): recompute each P tile from Q, K and L; returns dQ, dK, dV."""
    B, H, N, D = q.shape
    block = block or TWIN_BLOCK
    H_kv, dtype, acc_t = k.shape[1], q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, o, do = q.to(acc_t), o.to(acc_t), do.to(acc_t)
    k, v = (t.repeat_interleave(H // H_kv, dim=1).to(acc_t) for t in (k, v))
    delta = (do * o).sum(-1)                                      # rowsum(dO * O) = rowsum(P * dP)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for j in range(0, N, block):                                  # outer loop: key tile K_j, V_j
        kj, vj = k[:, :, j:j + block], v[:, :, j:j + block]
        for i in range(j if causal else 0, N, block):             # inner loop: query tiles; causal starts at j
            sl = slice(i, i + block)
            s = scale * q[:, :, sl] @ kj.transpose(-2, -1)
            if causal and i == j:
                rows, cols = (torch.arange(a, a + n, device=q.device) for a, n in zip((i, j), s.shape[-2:]))
                s = s.masked_fill(cols[None, :] > rows[:, None], -math.inf)
            p = torch.exp(s - lse[:, :, sl, None])
            dv[:, :, j:j + block] += p.transpose(-2, -1) @ do[:, :, sl]
            dp = do[:, :, sl] @ vj.transpose(-2, -1)
            ds = p * (dp - delta[:, :, sl, None])
            dq[:, :, sl] += scale * ds @ kj
            dk[:, :, j:j + block] += scale * ds.transpose(-2, -1) @ q[:, :, sl]
    dk, dv = (t.view(B, H_kv, H // H_kv, N, D).sum(2) for t in (dk, dv))  # GQA: a KV head's group adds up
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


# ------------------------------------------------------------------------------ the Triton kernels
def _configs(pairs, name_a, name_b):
    """Autotune candidates for Hopper; the interpreter cannot benchmark, so it gets one small config."""
    if INTERPRET:  # a held tile of two streamed ones: tests see the diagonal block cut in two
        return [triton.Config({name_a: 32, name_b: 16})]
    return [triton.Config({name_a: a, name_b: b}, num_warps=w, num_stages=s) for a, b, w, s in pairs]


# Forward and dQ: BLOCK_M query rows held, BLOCK_N key rows streamed (BLOCK_M a multiple of BLOCK_N). Three
# candidates per kernel (a large tile with 8 warps, the same with 4, a small one for short N and D = 128): each
# is compiled and timed once per autotuning key, so the candidate count sets the first call's cost.
FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)], "BLOCK_M", "BLOCK_N")
DQ_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)], "BLOCK_M", "BLOCK_N")
# dK/dV: BLOCK_N key rows held, BLOCK_M query rows streamed (BLOCK_N a multiple of BLOCK_M).
DKDV_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)], "BLOCK_N", "BLOCK_M")


@triton.jit
def _key_ranges(start_m, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The key tiles a query tile visits: [0, end_free) need no mask, [end_free, end) do."""
    if CAUSAL:  # tiles left of the diagonal are full; the diagonal block is masked; the rest is skipped
        end_free, end = start_m, tl.minimum(start_m + BLOCK_M, N)
    else:       # all full tiles, then the ragged last one
        end_free, end = (N // BLOCK_N) * BLOCK_N, N
    return end_free, end


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, rows, offs_n, offs_d, d_ok, lo, hi, N, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = d_ok & (cols[:, None] < N) if MASKED else d_ok
        k = tl.load(K + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # in log2 units: exp2 is the fast one
        if MASKED:
            keep = cols[None, :] < N
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = tl.where(keep, s, float("-inf"))  # every row keeps >= 1 entry per tile pass, so m stays finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=FWD_CONFIGS, key=["N_BUCKET", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, qk_scale, H, GROUP, N, N_BUCKET, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the diagonal block is whole key tiles
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # causal: the longest rows start first
    bh = tl.program_id(1)
    kv_off = (bh // H * (H // GROUP) + bh % H // GROUP).to(tl.int64) * N * HEAD_DIM  # KV head h // GROUP
    q_off = bh.to(tl.int64) * N * HEAD_DIM
    rows, offs_n, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM  # BLOCK_D is HEAD_DIM rounded up to a power of two
    q_ok = (rows[:, None] < N) & d_ok
    q = tl.load(Q + q_off + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=q_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end_free, end = _key_ranges(start_m, N, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K + kv_off, V + kv_off, rows, offs_n, offs_d, d_ok, 0, end_free,
                               N, qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL, PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K + kv_off, V + kv_off, rows, offs_n, offs_d, d_ok, end_free, end,
                               N, qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, PRECISION)
    tl.store(O + q_off + rows[:, None] * HEAD_DIM + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=q_ok)
    tl.store(LSE + bh.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rows < N)  # ln


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    off = tl.program_id(1).to(tl.int64) * N * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    ok = (rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + tl.program_id(1).to(tl.int64) * N + rows, tl.sum(o * do, 1), mask=rows < N)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, cols, offs_m, offs_d, d_ok, lo, hi, N, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        ok = d_ok & (rows[:, None] < N) if MASKED else d_ok
        q = tl.load(Q + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
        do = tl.load(DO + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
        lse = tl.load(LSE + rows, mask=rows < N, other=0.0) * 1.4426950408889634  # to log2 units
        delta = tl.load(DELTA + rows, mask=rows < N, other=0.0)
        # Transposed tiles (keys x queries): the products below then need no transposed accumulator.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if MASKED:
            keep = rows[None, :] < N
            if CAUSAL:
                keep = keep & (rows[None, :] >= cols[:, None])
            s_t = tl.where(keep, s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])  # P recomputed from L: exact probabilities, no running max needed
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, key=["N_BUCKET", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, qk_scale, sm_scale, H, GROUP, N, N_BUCKET,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    start_n = tl.program_id(0) * BLOCK_N  # causal: low key tiles see the most queries, and launch first
    bh_kv = tl.program_id(1)
    kv_off = bh_kv.to(tl.int64) * N * HEAD_DIM
    cols, offs_m, offs_d = start_n + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    kv_ok = (cols[:, None] < N) & d_ok
    k = tl.load(K + kv_off + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + kv_off + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Query tiles: causal ones start at the diagonal block (masked), then the full ones, then the ragged end.
    start_free = start_n + BLOCK_N if CAUSAL else 0
    end_full = (N // BLOCK_M) * BLOCK_M
    for g in range(GROUP):  # GQA: every query head of this KV head adds into the same dK, dV registers
        bh = bh_kv // (H // GROUP) * H + bh_kv % (H // GROUP) * GROUP + g
        Qh, DOh = Q + bh.to(tl.int64) * N * HEAD_DIM, DO + bh.to(tl.int64) * N * HEAD_DIM
        LSEh, DELTAh = LSE + bh.to(tl.int64) * N, DELTA + bh.to(tl.int64) * N
        if CAUSAL:
            dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, cols, offs_m, offs_d, d_ok, start_n,
                                 tl.minimum(start_free, N), N, qk_scale, HEAD_DIM, BLOCK_M, True, True, PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, cols, offs_m, offs_d, d_ok, start_free, end_full,
                             N, qk_scale, HEAD_DIM, BLOCK_M, False, CAUSAL, PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, cols, offs_m, offs_d, d_ok,
                             tl.maximum(end_full, start_free), N, N, qk_scale, HEAD_DIM, BLOCK_M, True, CAUSAL,
                             PRECISION)
    tl.store(DK + kv_off + cols[:, None] * HEAD_DIM + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kv_ok)
    tl.store(DV + kv_off + cols[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, rows, offs_n, offs_d, d_ok, lo, hi, N, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = d_ok & (cols[:, None] < N) if MASKED else d_ok
        k = tl.load(K + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            keep = cols[None, :] < N
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = tl.where(keep, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=["N_BUCKET", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, qk_scale, sm_scale, H, GROUP, N, N_BUCKET, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    kv_off = (bh // H * (H // GROUP) + bh % H // GROUP).to(tl.int64) * N * HEAD_DIM
    q_off = bh.to(tl.int64) * N * HEAD_DIM
    rows, offs_n, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    q_ok = (rows[:, None] < N) & d_ok
    q = tl.load(Q + q_off + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=q_ok, other=0.0)
    do = tl.load(DO + q_off + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=q_ok, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=rows < N, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=rows < N, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end_free, end = _key_ranges(start_m, N, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_tiles(dq, q, do, lse, delta, K + kv_off, V + kv_off, rows, offs_n, offs_d, d_ok, 0, end_free, N,
                   qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, K + kv_off, V + kv_off, rows, offs_n, offs_d, d_ok, end_free, end, N,
                   qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, PRECISION)
    tl.store(DQ + q_off + rows[:, None] * HEAD_DIM + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_ok)


# ------------------------------------------------------------------------------ launching, autograd, entry point
def _meta(q, k, causal):
    B, H, N, D = q.shape
    # fp32 inputs follow torch's matmul setting: tf32 dots (tensor cores, 10-bit mantissa) once a run sets
    # torch.set_float32_matmul_precision("high"), exact fp32 ("ieee") under the default "highest" that exact
    # comparisons keep. N_BUCKET is only the autotuner's key: tune once per power of two of N, not for every N
    # (generation grows N token by token).
    return dict(H=H, GROUP=H // k.shape[1], N=N, N_BUCKET=triton.next_power_of_2(N), HEAD_DIM=D,
                BLOCK_D=triton.next_power_of_2(D), CAUSAL=causal,
                PRECISION="ieee" if q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
                else "tf32")


def triton_forward(q, k, v, causal, scale):
    B, H, N, D = q.shape
    o, lse = torch.empty_like(q), torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)
    _fwd_kernel[grid](q, k, v, o, lse, scale * 1.4426950408889634, **_meta(q, k, causal))
    return o, lse


def triton_backward(q, k, v, o, lse, do, causal, scale):
    B, H, N, D = q.shape
    meta = _meta(q, k, causal)
    delta = torch.empty_like(lse)
    _bwd_delta_kernel[(triton.cdiv(N, 64), B * H)](o, do, delta, N, D, meta["BLOCK_D"], 64)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = (scale * 1.4426950408889634, scale)
    _bwd_dkdv_kernel[lambda m: (triton.cdiv(N, m["BLOCK_N"]), B * k.shape[1])](q, k, v, do, dk, dv, lse, delta,
                                                                               *args, **meta)
    _bwd_dq_kernel[lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)](q, k, v, do, dq, lse, delta, *args, **meta)
    return dq, dk, dv


def _uses_triton(x):
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = (triton_forward if _uses_triton(q) else twin_forward)(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)  # O(N) per head: no probabilities are kept
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        backward = triton_backward if _uses_triton(q) else twin_backward
        return (*backward(q, k, v, o, lse, do.contiguous(), ctx.causal, ctx.scale), None, None)


def check_inputs(q, k, v):
    """One-line errors for what the kernels cannot take, before any work; returns dense copies where needed."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise TypeError("flash_attention: q, k and v must be torch tensors")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"flash_attention: expected q (B, H, N, D) and k, v (B, H_kv, N, D), got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, N, D = q.shape
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"flash_attention: {H} query heads do not split into groups over {k.shape[1]} KV heads")
    if q.numel() == 0:
        raise ValueError(f"flash_attention: empty input, q {tuple(q.shape)}")
    if not HEAD_DIMS[0] <= D <= HEAD_DIMS[1]:
        raise ValueError(f"flash_attention: head dim {D} is unsupported; use {HEAD_DIMS[0]} to {HEAD_DIMS[1]}")
    if not q.device == k.device == v.device:
        raise ValueError(f"flash_attention: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"flash_attention: q, k, v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype})")
    dtypes = ((torch.float16, torch.bfloat16, torch.float32) if q.is_cuda else
              (torch.float32, torch.float16) if _uses_triton(q) else
              (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if q.dtype not in dtypes:
        where = "CUDA" if q.is_cuda else "the Triton interpreter" if _uses_triton(q) else "the CPU twin"
        raise ValueError(f"flash_attention: dtype {str(q.dtype)[6:]} is unsupported on {where}; use one of "
                         f"{', '.join(str(d)[6:] for d in dtypes)}")
    return (t.contiguous() for t in (q, k, v))  # the kernels index the dense (B, H, N, D) layout; copies if not


def flash_attention(q, k, v, causal=False, softmax_scale=None):
    """softmax(scale q k^T [+ causal mask]) v without the N x N matrix; q (B, H, N, D), k and v (B, H_kv, N, D)."""
    q, k, v = check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return FlashAttention.apply(q, k, v, bool(causal), scale)


# ------------------------------------------------------------------------------ the demo and the benchmark
def _grads(f, q, k, v, do):
    return torch.autograd.grad(f(q, k, v), (q, k, v), do)


def _cuda_ms(fn, reps=10):
    """Median of `reps` timed runs after warm-up (which also runs the autotuner), CUDA events."""
    for _ in range(3):
        fn()
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) for start, end in events)[reps // 2]


def _inputs(B, H, H_kv, N, D, dtype, device):
    q, do = (torch.randn(B, H, N, D, dtype=dtype, device=device) for _ in range(2))
    k, v = (torch.randn(B, H_kv, N, D, dtype=dtype, device=device) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)] + [do]


def check(device, dtype, B=2, H=8, H_kv=2, N=1000, D=128):
    """Causal attention and its gradients, ours and SDPA, against naive attention in float64."""
    from model import naive_attention
    q, k, v, do = _inputs(B, H, H_kv, N, D, dtype, device)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*leaves)
    want = [ref, *torch.autograd.grad(ref, leaves, do.double())]
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for name, f in (("ours", lambda q, k, v: flash_attention(q, k, v, causal=True)), ("sdpa", sdpa)):
        got = [f(q, k, v), *_grads(f, q, k, v, do)]
        errs = ", ".join(f"{n} {(a.double() - b).abs().max().item():.1e}"
                         for n, a, b in zip(("out", "dq", "dk", "dv"), got, want))
        print(f"  {name:<5} max |error| vs float64 naive, {str(dtype)[6:]}, B={B} H={H} H_kv={H_kv} N={N} D={D}: "
              f"{errs}")


def benchmark():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def f(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return f
    impls = {"ours": lambda q, k, v: flash_attention(q, k, v, causal=True),
             "flash": sdpa(SDPBackend.FLASH_ATTENTION), "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    print("\nTFLOP/s, causal, bf16, B*N = 16k tokens, H = 2048 / D (FLOPs: 2 B H N^2 D forward, x3.5 fwd+bwd)")
    print(f"{'D':>4} {'N':>6} | {'fwd: ours':>9} {'flash':>6} {'cudnn':>6} {'ours/flash':>10} | "
          f"{'fwd+bwd: ours':>13} {'flash':>6} {'cudnn':>6} {'ours/flash':>10}")
    for D in (64, 128):
        for N in (1024, 2048, 4096, 8192, 16384):
            B, H = 16384 // N, 2048 // D
            q, k, v, do = _inputs(B, H, H, N, D, torch.bfloat16, "cuda")
            flops = 2 * B * H * N * N * D
            tf = {}
            for name, f in impls.items():
                try:
                    tf[name] = (flops / _cuda_ms(lambda: f(q, k, v)) / 1e9,
                                3.5 * flops / _cuda_ms(lambda: _grads(f, q, k, v, do)) / 1e9)
                except RuntimeError as e:  # a backend that cannot take this shape on this machine
                    print(f"  {name} failed at D={D} N={N}: {str(e).splitlines()[0][:100]}")
                    tf[name] = (float("nan"), float("nan"))
            fwd, both = ([tf[n][i] for n in impls] for i in (0, 1))
            print(f"{D:>4} {N:>6} | {fwd[0]:>9.0f} {fwd[1]:>6.0f} {fwd[2]:>6.0f} {fwd[0] / fwd[1]:>10.2f} | "
                  f"{both[0]:>13.0f} {both[1]:>6.0f} {both[2]:>6.0f} {both[0] / both[1]:>10.2f}")


def memory():
    from model import naive_attention
    print("\npeak memory of forward + backward above the inputs, causal, bf16, B=1 H=16 D=128 (MiB)")
    print(f"{'N':>6} {'ours':>8} {'naive':>8} {'naive/ours':>10}")
    for N in (1024, 2048, 4096, 8192, 16384):
        q, k, v, do = _inputs(1, 16, 16, N, 128, torch.bfloat16, "cuda")
        peak = {}
        for name, f in (("ours", lambda q, k, v: flash_attention(q, k, v, causal=True)), ("naive", naive_attention)):
            try:
                _grads(f, q, k, v, do)  # warm-up: the autotuner's own buffers must not count
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                _grads(f, q, k, v, do)
                peak[name] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            except torch.OutOfMemoryError:
                peak[name] = float("nan")
            torch.cuda.empty_cache()
        print(f"{N:>6} {peak['ours']:>8.0f} {peak['naive']:>8.0f} {peak['naive'] / peak['ours']:>10.1f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    if torch.cuda.is_available():
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
        check("cuda", torch.bfloat16)
        benchmark()
        memory()
    else:
        where = "the Triton interpreter" if INTERPRET else "the PyTorch twin (TRITON_INTERPRET=1 runs the kernels)"
        print(f"No CUDA device: the benchmark needs a GPU. A correctness check of {where} instead:")
        check("cpu", torch.float32 if INTERPRET else torch.float64, B=1, H=4, H_kv=2, N=100, D=32)
