"""flash_attn.py: FlashAttention-2 forward and backward, Triton kernels beside a plain-PyTorch twin.

The idea: attention's N x N score matrix never needs to exist. Cut Q into query tiles and K, V into
key tiles small enough for on-chip memory; for one query tile, stream the key tiles past it and keep
a running row max m and row sum l (the online softmax), rescaling the partial output whenever m
grows. Only O and one number per row, the logsumexp L = m + log l, go back to HBM. The backward
recomputes each probability tile from Q, K and L instead of reading a stored P.

    forward   S = scale Q K^T,  P = exp(S - L),  O = P V          4 B H N^2 D FLOPs (half if causal)
    backward  Delta = rowsum(dO * O),  dV = P^T dO,  dP = dO V^T,
              dS = P * (dP - Delta),  dQ = scale dS K,  dK = scale dS^T Q        2.5x the forward
              (5 matmuls to the forward's 2; flash_kernels.py does 7: its dQ pass recomputes S, dP)
    memory    O(B H N D) for O, L and the gradients, against O(B H N^2) for naive attention

The twin (below) is the lecture's pseudo-code, FlashAttention-2's Algorithms 1 and 2, in PyTorch;
the Triton kernels (flash_kernels.py) are the same loops with one program instance per outer
iteration, plus what the GPU rewards (exp2, unmasked tiles away from the diagonal, longest tiles
first, autotuned tile sizes).

Masks beyond causal, both visiting only the tiles the mask leaves anything in:
    offset    query i sees key j iff j + k_offset <= i + q_offset: Q and K are two chunks of one
              longer sequence, the block ring attention computes (context_parallel.py);
              return_lse=True hands back L, with which results over disjoint key sets merge exactly
    doc       (B, N) document ids of examples packed into one row, non-decreasing: a query sees only
              its own document's keys; key tiles that end before the query tile's first document
              starts are skipped (and, not causal, those that start after its last one ends)
A row that sees no key (an offset can do that) gets O = 0 and L = -inf: it adds nothing to a merge.

Where it runs: CUDA tensors use the kernels (fp16, bf16; fp32 with tf32 dots, or exact fp32 ones
while torch.get_float32_matmul_precision() is "highest"). CPU tensors use the Triton interpreter
when TRITON_INTERPRET=1 was set before this file was imported (fp32, fp16), otherwise the twin (any
float dtype, float64 included). Head dims 16 to 128; grouped-query attention with H % H_kv == 0.

Run: `python flash_attn.py`: on a GPU, a bf16 check against SDPA, packed documents against one
causal row, then TFLOP/s of ours against SDPA's flash and cuDNN backends and peak memory against
naive attention; on a CPU, a float64 correctness demo of the twin and the packed documents' time.
"""
import math
import time

import torch
import torch.nn.functional as F

from flash_kernels import INTERPRET, triton_backward, triton_forward

TWIN_BLOCK = 32        # the twin's tile size (rows of Q and of K per tile)
HEAD_DIMS = (16, 128)  # the smallest and largest supported head dim


# ----------------------------------------------------------------------- the twin, in plain PyTorch
def doc_bounds(doc):
    """Document ids (B, N), non-decreasing along each row -> (ids, start, end) as int32 (B, N): the
    first index of each token's document and one past its last. They bound the tiles a query or key
    tile must visit."""
    doc = doc.contiguous()
    return tuple(t.to(torch.int32).contiguous() for t in
                 (doc, torch.searchsorted(doc, doc), torch.searchsorted(doc, doc, right=True)))


def _twin_keep(i, j, n_i, n_j, causal, offset, docs, device):
    """Which scores of the tile (query rows i.., key rows j..) are kept, as (B or 1, 1, n_i, n_j);
    None if all. Query i sees key j iff j <= i + offset (causal), both in one document (docs)."""
    rows, cols = torch.arange(i, i + n_i, device=device), torch.arange(j, j + n_j, device=device)
    keep = torch.ones(1, n_i, n_j, dtype=torch.bool, device=device)
    if causal:
        keep = keep & (cols[None, :] <= rows[:, None] + offset)
    if docs is not None:
        keep = keep & (docs[0][:, rows, None] == docs[0][:, None, cols])
    return None if keep.all() else keep[:, None]


def _twin_key_range(i, n_i, N, causal, offset, docs, block):
    """The only key tiles [lo, hi) that query rows i .. i + n_i - 1 can see (lo tile-aligned)."""
    lo, hi = 0, N
    if causal:                          # the last row sees keys up to i + n_i - 1 + offset
        hi = min(N, max(0, i + n_i + offset))
    # ids never decrease: earlier documents end before the first row's starts
    if docs is not None:
        lo = int(docs[1][:, i].min())
        if not causal:
            hi = min(hi, int(docs[2][:, i + n_i - 1].max()))
    return lo // block * block, hi


def _twin_query_range(j, n_j, N, causal, offset, docs, block):
    """The query tiles [lo, hi) that can see key rows j .. j + n_j - 1 (the backward's view)."""
    lo, hi = 0, N
    if causal:                          # the first row to see key j is j - offset
        lo = min(N, max(0, j - offset))
    if docs is not None:
        lo, hi = max(lo, int(docs[1][:, j].min())), int(docs[2][:, j + n_j - 1].max())
    return lo // block * block, hi


def twin_forward(q, k, v, causal, scale, block=None, offset=0, docs=None):
    """Algorithm 1 (forward): returns O and the logsumexp L of each row, nothing of size N x N.
    A row that sees no key (an offset can do that) gets O = 0 and L = -inf, adding nothing."""
    B, H, N, D = q.shape
    block = block or TWIN_BLOCK
    # 16-bit inputs, fp32 arithmetic: as the kernels do
    acc_t = torch.promote_types(q.dtype, torch.float32)
    # head h reads KV h // group
    k, v = (t.repeat_interleave(H // t.shape[1], dim=1).to(acc_t) for t in (k, v))
    o, lse = torch.empty_like(q), torch.empty(B, H, N, dtype=acc_t, device=q.device)
    for i in range(0, N, block):                                  # outer loop: query tile Q_i
        qi = q[:, :, i:i + block].to(acc_t)
        m = torch.full(qi.shape[:-1], -math.inf, dtype=acc_t, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(qi)
        lo, hi = _twin_key_range(i, qi.shape[2], N, causal, offset, docs, block)
        for j in range(lo, hi, block):                            # inner loop: the K_j it can see
            s = scale * qi @ k[:, :, j:j + block].transpose(-2, -1)
            keep = _twin_keep(i, j, *s.shape[-2:], causal, offset, docs, q.device)
            if keep is not None:                                  # tiles on the mask's edge only
                s = s.masked_fill(~keep, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            # a row with nothing kept yet: exp(-inf) = 0
            m_use = m_new.masked_fill(m_new == -math.inf, 0)
            p = torch.exp(s - m_use[..., None])
            # rescales what was summed under the old max
            alpha = torch.exp(m - m_use)
            l = alpha * l + p.sum(-1)
            acc = alpha[..., None] * acc + p @ v[:, :, j:j + block]
            m = m_new
        o[:, :, i:i + block] = (acc / l.masked_fill(l == 0, 1)[..., None]).to(q.dtype)
        lse[:, :, i:i + block] = m + torch.log(l)
    return o, lse


def twin_backward(q, k, v, o, lse, do, causal, scale, block=None, offset=0, docs=None):
    """Algorithm 2 (backward): recompute each P tile from Q, K and L; returns dQ, dK, dV.
    O and L may be those of a larger attention this call is one block of (ring attention):
    P = exp(S - L) is then this block's share of the whole softmax, and the gradients are this
    block's exact contribution."""
    B, H, N, D = q.shape
    block = block or TWIN_BLOCK
    H_kv, dtype, acc_t = k.shape[1], q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, o, do = q.to(acc_t), o.to(acc_t), do.to(acc_t)
    k, v = (t.repeat_interleave(H // H_kv, dim=1).to(acc_t) for t in (k, v))
    delta = (do * o).sum(-1)                                      # rowsum(dO * O) = rowsum(P * dP)
    lse = lse.masked_fill(lse == -math.inf, 0)                    # rows that saw no key have P = 0
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for j in range(0, N, block):                                  # outer loop: key tile K_j, V_j
        kj, vj = k[:, :, j:j + block], v[:, :, j:j + block]
        lo, hi = _twin_query_range(j, kj.shape[2], N, causal, offset, docs, block)
        for i in range(lo, hi, block):                            # inner loop: the Q_i that see it
            sl = slice(i, i + block)
            s = scale * q[:, :, sl] @ kj.transpose(-2, -1)
            keep = _twin_keep(i, j, *s.shape[-2:], causal, offset, docs, q.device)
            if keep is not None:
                s = s.masked_fill(~keep, -math.inf)
            p = torch.exp(s - lse[:, :, sl, None])
            dv[:, :, j:j + block] += p.transpose(-2, -1) @ do[:, :, sl]
            dp = do[:, :, sl] @ vj.transpose(-2, -1)
            ds = p * (dp - delta[:, :, sl, None])
            dq[:, :, sl] += scale * ds @ kj
            dk[:, :, j:j + block] += scale * ds.transpose(-2, -1) @ q[:, :, sl]
    # GQA: a KV head's group adds up
    dk, dv = (t.view(B, H_kv, H // H_kv, N, D).sum(2) for t in (dk, dv))
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


# ------------------------------------------------------------------------------ the entry point
def _uses_triton(x):
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


def attention_forward(q, k, v, causal, scale, offset=0, docs=None):
    """(O, L) of one attention block: the kernels for CUDA tensors (or under the interpreter), else
    the twin. offset: query i sees key j iff j <= i + offset (causal); docs: doc_bounds(doc).
    Inputs dense, as checked."""
    return (triton_forward if _uses_triton(q) else twin_forward)(q, k, v, causal, scale,
                                                                 offset=offset, docs=docs)


def attention_backward(q, k, v, o, lse, do, causal, scale, offset=0, docs=None):
    """(dQ, dK, dV) of one block, given O and L of the attention it is part of (own or merged)."""
    backward = triton_backward if _uses_triton(q) else twin_backward
    return backward(q, k, v, o, lse, do.contiguous(), causal, scale, offset=offset, docs=docs)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, offset, docs):
        o, lse = attention_forward(q, k, v, causal, scale, offset, docs)
        ctx.save_for_backward(q, k, v, o, lse)  # O(N) per head: no probabilities are kept
        ctx.causal, ctx.scale, ctx.offset, ctx.docs = causal, scale, offset, docs
        # returned for merging partial results; gradients flow through O only
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        return (*attention_backward(q, k, v, o, lse, do, ctx.causal, ctx.scale, ctx.offset,
                                    ctx.docs), None, None, None, None)


def check_inputs(q, k, v):
    """One-line errors for what the kernels cannot take, before any work; returns q, k, v dense."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise TypeError("flash_attention: q, k and v must be torch tensors")
    if (q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != k.shape[0]
            or q.shape[2:] != k.shape[2:]):
        raise ValueError(f"flash_attention: expected q (B, H, N, D) and k, v (B, H_kv, N, D), got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, N, D = q.shape
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"flash_attention: {H} query heads do not split into groups over "
                         f"{k.shape[1]} KV heads")
    if q.numel() == 0:
        raise ValueError(f"flash_attention: empty input, q {tuple(q.shape)}")
    if not HEAD_DIMS[0] <= D <= HEAD_DIMS[1]:
        raise ValueError(f"flash_attention: head dim {D} is unsupported; use {HEAD_DIMS[0]} to "
                         f"{HEAD_DIMS[1]}")
    if not q.device == k.device == v.device:
        raise ValueError(f"flash_attention: q, k, v on different devices ({q.device}, "
                         f"{k.device}, {v.device})")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"flash_attention: q, k, v have different dtypes ({q.dtype}, {k.dtype}, "
                         f"{v.dtype})")
    dtypes = ((torch.float16, torch.bfloat16, torch.float32) if q.is_cuda else
              (torch.float32, torch.float16) if _uses_triton(q) else
              (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if q.dtype not in dtypes:
        where = ("CUDA" if q.is_cuda else "the Triton interpreter" if _uses_triton(q)
                 else "the CPU twin")
        raise ValueError(f"flash_attention: dtype {str(q.dtype)[6:]} is unsupported on {where}; "
                         f"use one of {', '.join(str(d)[6:] for d in dtypes)}")
    # the kernels index the dense (B, H, N, D) layout; copies if not
    return (t.contiguous() for t in (q, k, v))


def check_doc(doc, q):
    """doc: (B, N) integer document ids of queries and keys alike, non-decreasing along a row."""
    B, N = q.shape[0], q.shape[2]
    if (not isinstance(doc, torch.Tensor) or doc.shape != (B, N) or doc.is_floating_point()
            or doc.is_complex()):
        what = (f"{doc.dtype} {tuple(doc.shape)}" if isinstance(doc, torch.Tensor)
                else type(doc).__name__)
        raise ValueError("flash_attention: doc must be integer document ids of shape (B, N) = "
                         f"({B}, {N}), got {what}")
    if doc.device != q.device:
        raise ValueError(f"flash_attention: doc on {doc.device}, q on {q.device}")
    if N > 1 and (doc[:, 1:] < doc[:, :-1]).any():
        b, i = (doc[:, 1:] < doc[:, :-1]).nonzero()[0].tolist()
        raise ValueError("flash_attention: doc ids must not decrease along a row (packed examples "
                         f"one after another); row {b} goes from {doc[b, i].item()} to "
                         f"{doc[b, i + 1].item()} at {i + 1}")
    return doc_bounds(doc)


def flash_attention(q, k, v, causal=False, softmax_scale=None, doc=None, q_offset=0, k_offset=0,
                    return_lse=False):
    """softmax(scale q k^T [+ mask]) v, no N x N matrix: q (B, H, N, D), k and v (B, H_kv, N, D).

    causal: query i sees key j iff j + k_offset <= i + q_offset (the offsets place two chunks of one
    longer sequence, as ring attention needs). doc: (B, N) document ids of packed examples,
    non-decreasing along a row: a query sees only keys of its own document. return_lse: also return
    L = logsumexp of each score row (B, H, N), fp32 (float64 for float64 inputs), -inf for a row
    that sees nothing, not differentiable.
    """
    q, k, v = check_inputs(q, k, v)
    offset = int(q_offset) - int(k_offset)
    if offset and not causal:
        raise ValueError("flash_attention: q_offset and k_offset shift the causal mask; they "
                         "need causal=True")
    docs = None
    if doc is not None:
        if offset:
            raise ValueError("flash_attention: doc ids are shared by queries and keys of one "
                             "sequence; they cannot take q_offset/k_offset")
        docs = check_doc(doc, q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    o, lse = FlashAttention.apply(q, k, v, bool(causal), scale, offset, docs)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------- the demo and the benchmark
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
    for name, f in (("ours", lambda q, k, v: flash_attention(q, k, v, causal=True)),
                    ("sdpa", sdpa)):
        got = [f(q, k, v), *_grads(f, q, k, v, do)]
        errs = ", ".join(f"{n} {(a.double() - b).abs().max().item():.1e}"
                         for n, a, b in zip(("out", "dq", "dk", "dv"), got, want))
        print(f"  {name:<5} max |error| vs float64 naive, {str(dtype)[6:]}, B={B} H={H} "
              f"H_kv={H_kv} N={N} D={D}: {errs}")


def benchmark():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def f(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return f
    impls = {"ours": lambda q, k, v: flash_attention(q, k, v, causal=True),
             "flash": sdpa(SDPBackend.FLASH_ATTENTION), "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    print("\nTFLOP/s, causal, bf16, B*N = 16k tokens, H = 2048 / D (FLOPs: 2 B H N^2 D forward, "
          "x3.5 fwd+bwd)")
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
            print(f"{D:>4} {N:>6} | {fwd[0]:>9.0f} {fwd[1]:>6.0f} {fwd[2]:>6.0f} "
                  f"{fwd[0] / fwd[1]:>10.2f} | {both[0]:>13.0f} {both[1]:>6.0f} {both[2]:>6.0f} "
                  f"{both[0] / both[1]:>10.2f}")


def memory():
    from model import naive_attention
    print("\npeak memory of forward + backward above the inputs, causal, bf16, "
          "B=1 H=16 D=128 (MiB)")
    print(f"{'N':>6} {'ours':>8} {'naive':>8} {'naive/ours':>10}")
    for N in (1024, 2048, 4096, 8192, 16384):
        q, k, v, do = _inputs(1, 16, 16, N, 128, torch.bfloat16, "cuda")
        peak = {}
        for name, f in (("ours", lambda q, k, v: flash_attention(q, k, v, causal=True)),
                        ("naive", naive_attention)):
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
        print(f"{N:>6} {peak['ours']:>8.0f} {peak['naive']:>8.0f} "
              f"{peak['naive'] / peak['ours']:>10.1f}")


def packing(device, dtype, N, docs, H=4, D=64, reps=3):
    """Packed documents: the doc mask against naive attention with the same mask, and the time of
    forward + backward with and without it (the skipped tiles are the saving: about 1/docs of causal
    attention's work)."""
    from model import naive_attention
    q, k, v, do = _inputs(1, H, H, N, D, dtype, device)
    doc = torch.arange(N, device=device) * docs // N  # `docs` equal documents one after another
    ms = {}
    for name, kw in (("causal", {}), ("packed", {"doc": doc[None]})):
        f = lambda: _grads(lambda q, k, v: flash_attention(q, k, v, causal=True, **kw), q, k, v, do)
        f()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        if device == "cuda":
            torch.cuda.synchronize()
        ms[name] = (time.perf_counter() - t0) / reps * 1e3
    want = naive_attention(*(t.detach().double() for t in (q, k, v)), doc=doc[None])
    err = (flash_attention(q, k, v, causal=True, doc=doc[None]).double() - want).abs().max().item()
    print(f"  packed: {docs} documents of {N // docs} in one row of {N}, {str(dtype)[6:]}: "
          f"max |error| vs naive with the same mask {err:.1e}; forward + backward "
          f"{ms['packed']:.0f} ms against {ms['causal']:.0f} ms for one causal row "
          f"({ms['causal'] / ms['packed']:.1f}x)")


if __name__ == "__main__":
    torch.manual_seed(0)
    if torch.cuda.is_available():
        import triton
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
              f"{triton.__version__}")
        check("cuda", torch.bfloat16)
        packing("cuda", torch.bfloat16, 16384, 16)
        benchmark()
        memory()
    else:
        where = ("the Triton interpreter" if INTERPRET
                 else "the PyTorch twin (TRITON_INTERPRET=1 runs the kernels)")
        print(f"No CUDA device: the benchmark needs a GPU. A correctness check of {where} instead:")
        check("cpu", torch.float32 if INTERPRET else torch.float64, B=1, H=4, H_kv=2, N=100, D=32)
        packing("cpu", torch.float32, 128 if INTERPRET else 1024, 4 if INTERPRET else 8, reps=1)
