"""flash_kernels.py: flash_attn.py's FlashAttention-2 loops as Triton kernels, forward and backward.

flash_attn.py holds the algorithm in plain PyTorch (the twin), the entry point and the demo; this
file holds the same loops with one program instance per outer iteration:
    twin_forward's loop over query tiles i  ->  _fwd_kernel, a program per (query tile, batch, head)
    twin_backward's Delta = rowsum(dO * O)  ->  _bwd_delta_kernel
    twin_backward's loop over key tiles j   ->  _bwd_dkdv_kernel, a program per key tile, batch and
                                                KV head; it also loops over the query heads sharing
                                                that KV head (GQA)
    twin_backward's dQ_i += scale dS K_j    ->  _bwd_dq_kernel, a second pass over query tiles: each
                                                dQ tile has one owner, so no atomic adds
                                                (FlashAttention-2 uses them)
The kernels add what the GPU rewards: exp2 with log2(e) folded into the scale; causal key tiles
above the diagonal never visited, tiles below it run without any mask, only the diagonal (and a
ragged last tile) masks; the longest causal query tiles launch first; tile sizes autotuned among
those that fit the head dim without spilling registers. With a causal offset the diagonal moves by
whole rows; with document ids every visited tile is masked and the tiles outside the query tile's
documents are not visited at all.

CUDA tensors run them compiled; CPU tensors run them in the Triton interpreter when
TRITON_INTERPRET=1 was set before the import (flash_attn.py chooses). Not run on its own:
`python flash_attn.py` is the demo.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton read it at import; so do we


def _configs(tiles, name_a, name_b):
    """Autotune candidates; the interpreter cannot benchmark, so it gets one small config."""
    if INTERPRET:  # a held tile of two streamed ones: tests see the diagonal block cut in two
        return [triton.Config({name_a: 32, name_b: 16})]
    return [triton.Config({name_a: a, name_b: b}, num_warps=w, num_stages=s)
            for a, b, w, s, _ in tiles]


def _for_head_dim(tiles):
    """Autotune's early pruning: the candidates made for the call's head dim (the last entry of a
    tile is the largest head dim it is made for)."""
    def prune(configs, nargs, **kwargs):
        return configs if INTERPRET else [c for c, t in zip(configs, tiles)
                                          if kwargs["HEAD_DIM"] <= t[-1]]
    return {"early_config_prune": prune}


# Tiles (a, b, warps, stages, largest head dim). Forward and dQ: BLOCK_M = a query rows held,
# BLOCK_N = b key rows streamed (BLOCK_M a multiple of BLOCK_N); dK/dV: BLOCK_N = a key rows held,
# BLOCK_M = b query rows streamed. Each candidate is compiled and timed once per autotuning key, so
# the count sets the first call's cost. None spills registers to local memory on sm_80 or sm_90a
# (`make kernels` compiles each at its largest head dim and prints ptxas's figures): at head dim 128
# the fp32 accumulators (dK and dV: 2 x BLOCK_N x 128) of the larger tiles outgrow the 255 registers
# a thread may have, and 4 warps holding 128 query rows spill even at 64 on sm_80.
FWD_TILES = [(128, 64, 8, 3, 128), (128, 32, 8, 3, 128), (64, 64, 4, 3, 128)]
DQ_TILES = [(128, 64, 8, 3, 64), (128, 32, 8, 3, 128), (64, 32, 4, 3, 128)]
DKDV_TILES = [(128, 32, 8, 3, 64), (64, 16, 8, 3, 128), (32, 16, 4, 3, 128)]
FWD_CONFIGS = _configs(FWD_TILES, "BLOCK_M", "BLOCK_N")
DQ_CONFIGS = _configs(DQ_TILES, "BLOCK_M", "BLOCK_N")
DKDV_CONFIGS = _configs(DKDV_TILES, "BLOCK_N", "BLOCK_M")


@triton.jit
def _key_ranges(start_m, N, OFFSET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr):
    """The key tiles a query tile visits: [0, end_free) need no mask, [end_free, end) do."""
    # keys j <= i + OFFSET: whole tiles up to the first row's edge, masked ones up to the last row's
    if CAUSAL:
        end_free = tl.minimum(tl.maximum(start_m + OFFSET + 1, 0) // BLOCK_N * BLOCK_N,
                              N // BLOCK_N * BLOCK_N)
        end = tl.minimum(tl.maximum(start_m + BLOCK_M + OFFSET, 0), N)
    else:       # all full tiles, then the ragged last one
        end_free, end = (N // BLOCK_N) * BLOCK_N, N
    return end_free, end


@triton.jit
def _mask_scores(s, rows, cols, docq, DOCK, N, OFFSET, CAUSAL: tl.constexpr, DOC: tl.constexpr):
    """-inf where query row i may not see key j: j past the end, j > i + OFFSET (causal), another
    document. The forward and the dQ pass mask alike; the dK/dV pass holds the transposed tile and
    masks it in place."""
    keep = cols[None, :] < N
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + OFFSET)
    if DOC:
        keep = keep & (tl.load(DOCK + cols, mask=cols < N, other=-1)[None, :] == docq[:, None])
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, rows, docq, DOCK, offs_n, offs_d, d_ok, lo, hi, N, OFFSET,
               qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, DOC: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = d_ok & (cols[:, None] < N) if MASKED else d_ok
        k = tl.load(K + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
        # in log2 units: exp2 is the fast one
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            s = _mask_scores(s, rows, cols, docq, DOCK, N, OFFSET, CAUSAL, DOC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing kept yet: exp2(-inf) = 0, no nan
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=FWD_CONFIGS, key=["N_BUCKET", "HEAD_DIM", "CAUSAL"],
                 prune_configs_by=_for_head_dim(FWD_TILES))
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, DOCS, DSTART, DEND, qk_scale, H, GROUP, N, N_BUCKET, OFFSET,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                DOC: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the diagonal block is whole key tiles
    # causal: the longest rows start first
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    # KV head h // GROUP
    kv_off = (bh // H * (H // GROUP) + bh % H // GROUP).to(tl.int64) * N * HEAD_DIM
    q_off = bh.to(tl.int64) * N * HEAD_DIM
    # this batch row's document ids, shared by queries and keys
    doc_off = (bh // H).to(tl.int64) * N
    rows, offs_n, offs_d = (start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N),
                            tl.arange(0, BLOCK_D))
    d_ok = offs_d[None, :] < HEAD_DIM  # BLOCK_D is HEAD_DIM rounded up to a power of two
    q_ok = (rows[:, None] < N) & d_ok
    q = tl.load(Q + q_off + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=q_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end_free, end = _key_ranges(start_m, N, OFFSET, BLOCK_M, BLOCK_N, CAUSAL)
    if DOC:  # any tile may cross a document edge; tiles before the first row's document are skipped
        docq = tl.load(DOCS + doc_off + rows, mask=rows < N, other=-2)
        lo = tl.load(DSTART + doc_off + start_m) // BLOCK_N * BLOCK_N
        if not CAUSAL:  # nor those after the last row's document
            end = tl.load(DEND + doc_off + tl.minimum(start_m + BLOCK_M, N) - 1)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K + kv_off, V + kv_off, rows, docq,
                                   DOCS + doc_off, offs_n, offs_d, d_ok, lo, end, N, OFFSET,
                                   qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, True, PRECISION)
    else:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K + kv_off, V + kv_off, rows, rows, DOCS,
                                   offs_n, offs_d, d_ok, 0, end_free, N, OFFSET, qk_scale, HEAD_DIM,
                                   BLOCK_N, False, CAUSAL, False, PRECISION)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K + kv_off, V + kv_off, rows, rows, DOCS,
                                   offs_n, offs_d, d_ok, end_free, end, N, OFFSET, qk_scale,
                                   HEAD_DIM, BLOCK_N, True, CAUSAL, False, PRECISION)
    # a row that saw no key (an offset can do that): O = 0, L = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(O + q_off + rows[:, None] * HEAD_DIM + offs_d[None, :],
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=q_ok)
    # L back in natural-log units: ln x = log2 x * ln 2
    tl.store(LSE + bh.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453,
             mask=rows < N)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    off = tl.program_id(1).to(tl.int64) * N * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    ok = (rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + tl.program_id(1).to(tl.int64) * N + rows, tl.sum(o * do, 1), mask=rows < N)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, cols, dock, DOCQ, offs_m, offs_d, d_ok, lo, hi, N,
                OFFSET, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                DOC: tl.constexpr, PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        ok = d_ok & (rows[:, None] < N) if MASKED else d_ok
        q = tl.load(Q + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
        do = tl.load(DO + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
        lse = tl.load(LSE + rows, mask=rows < N, other=0.0) * 1.4426950408889634  # to log2 units
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # a row that saw no key: its P is 0 anyway
        delta = tl.load(DELTA + rows, mask=rows < N, other=0.0)
        # Transposed tiles (keys x queries): the products below then need no transposed accumulator.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if MASKED:
            keep = rows[None, :] < N
            if CAUSAL:
                keep = keep & (rows[None, :] + OFFSET >= cols[:, None])
            if DOC:
                keep = keep & (tl.load(DOCQ + rows, mask=rows < N, other=-2)[None, :]
                               == dock[:, None])
            s_t = tl.where(keep, s_t, float("-inf"))
        # P recomputed from L: exact probabilities, no running max needed
        p_t = tl.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, key=["N_BUCKET", "HEAD_DIM", "CAUSAL"],
                 prune_configs_by=_for_head_dim(DKDV_TILES))
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, DOCS, DSTART, DEND, qk_scale, sm_scale, H,
                     GROUP, N, N_BUCKET, OFFSET, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     CAUSAL: tl.constexpr, DOC: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    # causal: low key tiles see the most queries, and launch first
    start_n = tl.program_id(0) * BLOCK_N
    bh_kv = tl.program_id(1)
    kv_off = bh_kv.to(tl.int64) * N * HEAD_DIM
    doc_off = (bh_kv // (H // GROUP)).to(tl.int64) * N
    cols, offs_m, offs_d = (start_n + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_M),
                            tl.arange(0, BLOCK_D))
    d_ok = offs_d[None, :] < HEAD_DIM
    kv_ok = (cols[:, None] < N) & d_ok
    k = tl.load(K + kv_off + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + kv_off + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Query tiles: causal ones from the first row that sees key start_n (i >= j - OFFSET) are
    # masked up to the first row that sees the whole key tile (start_free); then full ones, then
    # the ragged end.
    lo = start_n * 0
    start_free = start_n * 0
    if CAUSAL:
        lo = tl.maximum(start_n - OFFSET, 0) // BLOCK_M * BLOCK_M
        start_free = (tl.maximum(start_n + BLOCK_N - 1 - OFFSET, 0)
                      + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end_full = (N // BLOCK_M) * BLOCK_M
    dock = cols
    hi = N
    # only the queries of the key tile's documents: from the first one's start to the last one's end
    if DOC:
        dock = tl.load(DOCS + doc_off + cols, mask=cols < N, other=-1)
        lo = tl.maximum(lo, tl.load(DSTART + doc_off + start_n)) // BLOCK_M * BLOCK_M
        hi = tl.load(DEND + doc_off + tl.minimum(start_n + BLOCK_N, N) - 1)
    # GQA: every query head of this KV head adds into the same dK, dV registers
    for g in range(GROUP):
        bh = bh_kv // (H // GROUP) * H + bh_kv % (H // GROUP) * GROUP + g
        Qh, DOh = Q + bh.to(tl.int64) * N * HEAD_DIM, DO + bh.to(tl.int64) * N * HEAD_DIM
        LSEh, DELTAh = LSE + bh.to(tl.int64) * N, DELTA + bh.to(tl.int64) * N
        if DOC:
            dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, cols, dock, DOCS + doc_off,
                                 offs_m, offs_d, d_ok, lo, hi, N, OFFSET, qk_scale, HEAD_DIM,
                                 BLOCK_M, True, CAUSAL, True, PRECISION)
        else:
            if CAUSAL:
                dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, cols, dock, DOCS, offs_m,
                                     offs_d, d_ok, lo, tl.minimum(start_free, N), N, OFFSET,
                                     qk_scale, HEAD_DIM, BLOCK_M, True, True, False, PRECISION)
            dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, cols, dock, DOCS, offs_m,
                                 offs_d, d_ok, start_free, end_full, N, OFFSET, qk_scale, HEAD_DIM,
                                 BLOCK_M, False, CAUSAL, False, PRECISION)
            dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, cols, dock, DOCS, offs_m,
                                 offs_d, d_ok, tl.maximum(end_full, start_free), N, N, OFFSET,
                                 qk_scale, HEAD_DIM, BLOCK_M, True, CAUSAL, False, PRECISION)
    tl.store(DK + kv_off + cols[:, None] * HEAD_DIM + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + kv_off + cols[:, None] * HEAD_DIM + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, rows, docq, DOCK, offs_n, offs_d, d_ok, lo, hi, N,
              OFFSET, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, DOC: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = d_ok & (cols[:, None] < N) if MASKED else d_ok
        k = tl.load(K + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            s = _mask_scores(s, rows, cols, docq, DOCK, N, OFFSET, CAUSAL, DOC)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=["N_BUCKET", "HEAD_DIM", "CAUSAL"],
                 prune_configs_by=_for_head_dim(DQ_TILES))
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, DOCS, DSTART, DEND, qk_scale, sm_scale, H, GROUP, N,
                   N_BUCKET, OFFSET, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, DOC: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    kv_off = (bh // H * (H // GROUP) + bh % H // GROUP).to(tl.int64) * N * HEAD_DIM
    q_off = bh.to(tl.int64) * N * HEAD_DIM
    doc_off = (bh // H).to(tl.int64) * N
    rows, offs_n, offs_d = (start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N),
                            tl.arange(0, BLOCK_D))
    d_ok = offs_d[None, :] < HEAD_DIM
    q_ok = (rows[:, None] < N) & d_ok
    q = tl.load(Q + q_off + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=q_ok, other=0.0)
    do = tl.load(DO + q_off + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=q_ok, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=rows < N, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=rows < N, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end_free, end = _key_ranges(start_m, N, OFFSET, BLOCK_M, BLOCK_N, CAUSAL)
    if DOC:  # the same tiles as the forward visits
        docq = tl.load(DOCS + doc_off + rows, mask=rows < N, other=-2)
        lo = tl.load(DSTART + doc_off + start_m) // BLOCK_N * BLOCK_N
        if not CAUSAL:
            end = tl.load(DEND + doc_off + tl.minimum(start_m + BLOCK_M, N) - 1)
        dq = _dq_tiles(dq, q, do, lse, delta, K + kv_off, V + kv_off, rows, docq, DOCS + doc_off,
                       offs_n, offs_d, d_ok, lo, end, N, OFFSET, qk_scale, HEAD_DIM, BLOCK_N, True,
                       CAUSAL, True, PRECISION)
    else:
        dq = _dq_tiles(dq, q, do, lse, delta, K + kv_off, V + kv_off, rows, rows, DOCS, offs_n,
                       offs_d, d_ok, 0, end_free, N, OFFSET, qk_scale, HEAD_DIM, BLOCK_N, False,
                       CAUSAL, False, PRECISION)
        dq = _dq_tiles(dq, q, do, lse, delta, K + kv_off, V + kv_off, rows, rows, DOCS, offs_n,
                       offs_d, d_ok, end_free, end, N, OFFSET, qk_scale, HEAD_DIM, BLOCK_N, True,
                       CAUSAL, False, PRECISION)
    tl.store(DQ + q_off + rows[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok)


# ------------------------------------------------------------------------------ launching
def _meta(q, k, causal, offset, docs):
    B, H, N, D = q.shape
    # fp32 inputs follow torch's matmul setting: tf32 dots (tensor cores, 10-bit mantissa) once a
    # run sets torch.set_float32_matmul_precision("high"), exact fp32 ("ieee") under the default
    # "highest" that exact comparisons keep. N_BUCKET is only the autotuner's key: tune once per
    # power of two of N, not for every N (generation grows N token by token).
    exact = q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return dict(H=H, GROUP=H // k.shape[1], N=N, N_BUCKET=triton.next_power_of_2(N), OFFSET=offset,
                HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), CAUSAL=causal, DOC=docs is not None,
                PRECISION="ieee" if exact else "tf32")


def _doc_args(q, docs):
    """(ids, start, end) of doc_bounds; without documents, a placeholder the kernels never read."""
    return docs if docs is not None else (torch.zeros(1, dtype=torch.int32, device=q.device),) * 3


def triton_forward(q, k, v, causal, scale, offset=0, docs=None):
    B, H, N, D = q.shape
    o, lse = torch.empty_like(q), torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)
    _fwd_kernel[grid](q, k, v, o, lse, *_doc_args(q, docs), scale * 1.4426950408889634,
                      **_meta(q, k, causal, offset, docs))
    return o, lse


def triton_backward(q, k, v, o, lse, do, causal, scale, offset=0, docs=None):
    B, H, N, D = q.shape
    meta = _meta(q, k, causal, offset, docs)
    delta = torch.empty_like(lse)
    _bwd_delta_kernel[(triton.cdiv(N, 64), B * H)](o, do, delta, N, D, meta["BLOCK_D"], 64)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = (*_doc_args(q, docs), scale * 1.4426950408889634, scale)
    dkdv_grid = lambda m: (triton.cdiv(N, m["BLOCK_N"]), B * k.shape[1])
    dq_grid = lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)
    _bwd_dkdv_kernel[dkdv_grid](q, k, v, do, dk, dv, lse, delta, *args, **meta)
    _bwd_dq_kernel[dq_grid](q, k, v, do, dq, lse, delta, *args, **meta)
    return dq, dk, dv
