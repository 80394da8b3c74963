"""flash_attn.py against naive attention: the twin in float64, the Triton kernels interpreted.

The Triton interpreter is switched on by TRITON_INTERPRET=1, read once when triton is imported;
setting it here would change every later test in this process. So the interpreter cases run in one
child process (this file run as a script) that computes the outputs and gradients; the comparisons
happen here, one test per case.
"""
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import flash_attn
import pretrain
from flash_attn import flash_attention
from model import PRESETS, Transformer

ROOT = Path(__file__).resolve().parent.parent

# (B, H, H_kv, N, D, causal): odd lengths (ragged last tiles), GQA groups of 1 to 4, head dims
# that are and are not powers of two. The twin runs with 16-row tiles, the interpreter with
# 32 x 16 tiles.
CASES = [
    (1, 2, 2, 16, 16, True),
    (2, 4, 2, 37, 32, True),
    (1, 4, 1, 50, 24, False),
    (1, 3, 3, 33, 64, True),
    (2, 2, 1, 70, 40, False),
    (1, 2, 1, 7, 128, True),
    (1, 1, 1, 1, 16, True),
]


def naive(q, k, v, causal, scale=None, doc=None, q_offset=0, k_offset=0, return_lse=False):
    """softmax(scale q k^T + mask) v, materialising the N x N matrix. A row that sees no key gives
    O = 0 and L = -inf."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (scale or 1 / math.sqrt(q.shape[-1])) * q @ k.transpose(-2, -1)
    i = torch.arange(q.shape[2], device=q.device)
    keep = torch.ones(1, 1, len(i), len(i), dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & (i[None, :] + k_offset <= i[:, None] + q_offset)
    if doc is not None:
        keep = keep & (doc[:, None, :, None] == doc[:, None, None, :])
    s = s.masked_fill(~keep, -math.inf)
    # softmax of a row of -inf is nan: give it zeros, and zero gradients
    dead = ~keep.any(-1, keepdim=True)
    o = torch.softmax(s.masked_fill(dead, 0), -1).masked_fill(~keep, 0) @ v
    return (o, s.logsumexp(-1)) if return_lse else o


def make_inputs(case, seed=0):
    B, H, H_kv, N, D, _ = case
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, H_kv, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, do


def run(fn, q, k, v, do, dtype, causal, **kw):
    """Output and (dq, dk, dv) of fn at dtype, returned in float64."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, causal=causal, **kw)
    out.backward(do.to(dtype))
    return [t.double() for t in (out, *(x.grad for x in leaves))]


def assert_all_close(got, want, **tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


# -------------------------------------------------------------------------- the twin (CPU fallback)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_twin_matches_naive_in_float64(case, monkeypatch):
    monkeypatch.setattr(flash_attn, "TWIN_BLOCK", 16)
    q, k, v, do = make_inputs(case)
    causal = case[-1]
    # Same arithmetic in another order, float64: agreement to ~1e-13 relative.
    assert_all_close(run(flash_attention, q, k, v, do, torch.float64, causal),
                     run(naive, q, k, v, do, torch.float64, causal), rtol=1e-10, atol=1e-12)
    _, lse = flash_attn.twin_forward(q, k, v, causal, 0.5, block=16)
    g = q.shape[1] // k.shape[1]
    s = 0.5 * q @ k.repeat_interleave(g, 1).transpose(-2, -1)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse, s.logsumexp(-1), rtol=1e-12, atol=1e-12)


def test_softmax_scale_is_used():
    q, k, v, do = make_inputs((1, 2, 1, 20, 16, False))
    assert_all_close(run(flash_attention, q, k, v, do, torch.float64, False, softmax_scale=0.3),
                     run(naive, q, k, v, do, torch.float64, False, scale=0.3),
                     rtol=1e-10, atol=1e-12)


def test_non_contiguous_inputs_give_the_same_result():
    q, k, v, do = make_inputs((2, 4, 2, 24, 32, True))
    dense = run(flash_attention, q, k, v, do, torch.float64, True)
    # As model.py passes them, (B, N, H, D) storage seen through a transpose; then a view of
    # every other element of D (stride 2).
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not strided[0].is_contiguous()
    assert_all_close(run(flash_attention, *strided, do, torch.float64, True), dense, rtol=0, atol=0)
    wide = [torch.stack([t, torch.zeros_like(t)], -1).flatten(-2)[..., ::2] for t in (q, k, v)]
    assert wide[0].stride(-1) == 2
    assert_all_close(run(flash_attention, *wide, do, torch.float64, True), dense, rtol=0, atol=0)


# ----------------------------------------------------------------- masks: causal offsets, documents
def packed(*rows):
    """(B, N) document ids of examples of these lengths, a row per argument: packed([3, 5], [8])."""
    return torch.stack([torch.arange(len(r)).repeat_interleave(torch.tensor(r)) for r in rows])


# (case, keyword arguments): offsets that widen the band, empty the first rows, unmask or mask
# everything; documents of ragged lengths (tile edges fall inside them), different per row,
# causal and not, with GQA.
MASK_CASES = [
    ((1, 2, 1, 40, 16, True), dict(q_offset=24)),
    ((1, 2, 2, 37, 32, True), dict(k_offset=5)),
    ((2, 2, 1, 33, 16, True), dict(q_offset=64, k_offset=16)),
    ((1, 2, 1, 40, 16, True), dict(q_offset=3, k_offset=43)),
    ((2, 2, 1, 45, 16, True), dict(doc=packed([5, 17, 23], [1, 44]))),
    ((2, 2, 1, 45, 16, False), dict(doc=packed([20, 25], [7, 7, 7, 24]))),
    ((1, 2, 1, 70, 24, True), dict(doc=packed([33, 1, 36]))),
]


def run_lse(fn, q, k, v, do, dtype, causal, **kw):
    """run() plus the logsumexp of each row."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves, causal=causal, return_lse=True, **kw)
    out.backward(do.to(dtype))
    return [t.double() for t in (out, *(x.grad for x in leaves), lse)]


@pytest.mark.parametrize("case, kw", MASK_CASES, ids=str)
def test_twin_masks_match_naive_in_float64(case, kw, monkeypatch):
    monkeypatch.setattr(flash_attn, "TWIN_BLOCK", 16)
    q, k, v, do = make_inputs(case)
    got, want = (run_lse(f, q, k, v, do, torch.float64, case[-1], **kw)
                 for f in (flash_attention, naive))
    # -inf logsumexp (rows that see nothing) compare equal; everything else to float64 rounding.
    for name, a, b in zip(("out", "dq", "dk", "dv", "lse"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def poisoned(fn, dtype, causal):
    """Three tile-aligned documents of 32 tokens; every input outside the middle one is nan. The
    middle one's results are returned beside those of attention over that document alone: equal,
    and finite, only if no tile of another document was read (a masked nan still poisons:
    0 * nan = nan)."""
    q, k, v, do = make_inputs((1, 2, 1, 96, 16, causal))
    mine = torch.arange(96) // 32 == 1
    bad = [t.clone().masked_fill(~mine[:, None], math.nan) for t in (q, k, v, do)]
    got = run(fn, *bad, dtype, causal, doc=packed([32, 32, 32]))
    alone = run(naive, *(t[:, :, mine] for t in (q, k, v, do)), torch.float64, causal)
    return [t[:, :, mine] for t in got], alone


@pytest.mark.parametrize("causal", [True, False])
def test_twin_skips_tiles_of_other_documents(causal, monkeypatch):
    monkeypatch.setattr(flash_attn, "TWIN_BLOCK", 16)
    got, alone = poisoned(flash_attention, torch.float64, causal)
    assert_all_close(got, alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw, match", [
    (dict(q_offset=4), "q_offset and k_offset shift the causal mask; they need causal=True"),
    (dict(causal=True, doc=torch.zeros(1, 8, dtype=torch.long), k_offset=2),
     "cannot take q_offset/k_offset"),
    (dict(doc=torch.zeros(1, 9, dtype=torch.long)),
     r"doc must be integer document ids of shape \(B, N\) = \(1, 8\), got torch.int64 \(1, 9\)"),
    (dict(doc=torch.zeros(1, 8)), "doc must be integer document ids"),
    (dict(doc=torch.tensor([[0, 0, 1, 1, 0, 2, 2, 2]])),
     "must not decrease along a row.*row 0 goes from 1 to 0 at 4"),
])
def test_bad_masks_get_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(*(torch.zeros(1, 2, 8, 16) for _ in range(3)), **kw)


def test_model_with_flash_matches_naive_in_float64():
    cfg = replace(PRESETS["tiny"], n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96,
                  block_size=48)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 45))
    out = {}
    for backend in ("naive", "flash"):
        for b in model.blocks:
            b.attn.backend = backend
        logits, loss = model(idx, idx)
        loss.backward()
        out[backend] = (logits, [p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    torch.testing.assert_close(out["flash"][0], out["naive"][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(out["flash"][1], out["naive"][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_training_with_flash_matches_sdpa(tmp_path, stdlib_data):
    fast = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--max-steps", "3",
            "--warmup-steps", "1", "--eval-iters", "1", "--eval-every", "3", "--sample-tokens", "0",
            "--log-every", "1"]
    runs = {a: pretrain.main(fast + ["--attn", a, "--out", str(tmp_path / a)])
            for a in ("sdpa", "flash")}
    # fp32, same maths in another summation order: equal to float32 rounding, amplified a little by
    # 3 steps. (Not the weights: AdamW turns a rounding-level gradient near zero into a full-size
    # step of either sign.)
    assert runs["flash"]["losses"] == pytest.approx(runs["sdpa"]["losses"], rel=1e-5)


# ------------------------------------------------------------------------------ bad input
def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("args, match", [
    ((t(1, 2, 8, 8), t(1, 2, 8, 8), t(1, 2, 8, 8)), "head dim 8 is unsupported; use 16 to 128"),
    ((t(1, 2, 8, 256), t(1, 2, 8, 256), t(1, 2, 8, 256)), "head dim 256 is unsupported"),
    ((t(1, 2, 8, 16, dtype=torch.int64),) * 3, "dtype int64 is unsupported on the CPU twin"),
    ((t(1, 2, 8, 16), t(1, 2, 8, 16, dtype=torch.float64), t(1, 2, 8, 16)), "different dtypes"),
    ((t(1, 2, 8, 16), t(1, 2, 8, 16, device="meta"), t(1, 2, 8, 16)), "different devices"),
    ((t(1, 3, 8, 16), t(1, 2, 8, 16), t(1, 2, 8, 16)),
     "3 query heads do not split into groups over 2"),
    ((t(1, 2, 8, 16), t(1, 2, 9, 16), t(1, 2, 9, 16)), r"expected q \(B, H, N, D\)"),
    ((t(1, 2, 8, 16), t(1, 2, 8, 16), t(1, 1, 8, 16)), "expected q"),
    ((t(2, 2, 8, 16), t(1, 2, 8, 16), t(1, 2, 8, 16)), "expected q"),
    ((t(2, 8, 16), t(2, 8, 16), t(2, 8, 16)), "expected q"),
    ((t(1, 2, 0, 16), t(1, 2, 0, 16), t(1, 2, 0, 16)), "empty input"),
])
def test_bad_input_gets_a_clear_error(args, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(*args)
    with pytest.raises(TypeError, match="q, k and v must be torch tensors"):
        flash_attention(args[0].tolist(), args[1], args[2])


# ------------------------------------------------------------------ the Triton kernels, interpreted
INTERP_CASES = [(case, torch.float32) for case in CASES] + [(CASES[1], torch.float16),
                                                            (CASES[4], torch.float16)]


def interpreter_child(path):
    """In the child (TRITON_INTERPRET=1 set before the import): every case through the kernels."""
    assert flash_attn.INTERPRET
    jobs, results = torch.load(path), {}
    for i, (case, dtype) in enumerate(jobs["cases"]):
        q, k, v, do = make_inputs(case)
        results[i] = run(flash_attention, q, k, v, do, dtype, case[-1])
    q, k, v, do = make_inputs(CASES[1])  # non-contiguous, as model.py passes them
    strided = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    results["strided"] = run(flash_attention, *strided, do, torch.float32, True)
    for i, (case, kw) in enumerate(MASK_CASES):
        results["mask", i] = run_lse(flash_attention, *make_inputs(case), torch.float32, case[-1],
                                     **kw)
    for causal in (True, False):
        results["poisoned", causal] = poisoned(flash_attention, torch.float32, causal)
    try:
        flash_attention(*(x.bfloat16() for x in (q, k, v)))
    except ValueError as e:
        results["bf16"] = str(e)
    # One forward and backward of a small model: the kernels as model.py calls them, against SDPA.
    cfg = replace(PRESETS["tiny"], n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96,
                  block_size=40)
    idx = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    for backend in ("sdpa", "flash"):
        torch.manual_seed(0)
        model = Transformer(replace(cfg, attn=backend))
        logits, loss = model(idx, idx)
        loss.backward()
        results[backend] = [logits.detach()] + [p.grad for p in model.parameters()]
    torch.save(results, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    path = tmp_path_factory.mktemp("interp") / "jobs.pt"
    torch.save({"cases": INTERP_CASES}, path)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


@pytest.mark.parametrize("i", range(len(INTERP_CASES)),
                         ids=[f"{c}-{str(d)[6:]}" for c, d in INTERP_CASES])
def test_triton_kernels_match_naive(interpreted, i):
    case, dtype = INTERP_CASES[i]
    # the reference sees the same inputs
    q, k, v, do = (x.to(dtype).double() for x in make_inputs(case))
    want = run(naive, q, k, v, do, torch.float64, case[-1])
    if dtype == torch.float32:
        # fp32 in, fp32 dots (the interpreter's tl.dot is exact fp32), float64 reference: rounding
        # of about 6e-8 per operation over sums of at most N + D < 256 terms of O(1) values stays
        # well under 1e-5.
        assert_all_close(interpreted[i], want, rtol=1e-5, atol=1e-5)
    else:
        # fp16: the kernels round P and dS to fp16 before their matmuls (as FlashAttention does on
        # GPUs) and round the results; measured about 1 fp16 unit (u = 2^-11) of each tensor's
        # largest entry, allowed 4.
        for name, a, w in zip(("out", "dq", "dk", "dv"), interpreted[i], want):
            assert (a - w).abs().max() <= 4 * 2 ** -11 * w.abs().max(), name


def test_triton_kernels_take_non_contiguous_inputs(interpreted):
    q, k, v, do = make_inputs(CASES[1])
    assert_all_close(interpreted["strided"], run(naive, q, k, v, do, torch.float64, True),
                     rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("i", range(len(MASK_CASES)), ids=[str(c) for c in MASK_CASES])
def test_triton_kernels_masks_match_naive(interpreted, i):
    case, kw = MASK_CASES[i]
    q, k, v, do = (x.float().double() for x in make_inputs(case))
    want = run_lse(naive, q, k, v, do, torch.float64, case[-1], **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv", "lse"), interpreted["mask", i], want):
        # fp32: as above
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("causal", [True, False])
def test_triton_kernels_skip_tiles_of_other_documents(interpreted, causal):
    got, alone = interpreted["poisoned", causal]
    assert_all_close(got, alone, rtol=1e-5, atol=1e-5)


def test_interpreter_refuses_bf16(interpreted):
    assert ("dtype bfloat16 is unsupported on the Triton interpreter; use one of float32, float16"
            in interpreted["bf16"])


def test_model_with_triton_kernels_matches_sdpa(interpreted):
    # fp32 model, same maths in another order: logits and gradients agree to float32 rounding.
    for a, b in zip(interpreted["flash"], interpreted["sdpa"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------- on a GPU, when there is one
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_bf16_is_as_accurate_as_sdpa(causal):
    B, H, H_kv, N, D = 2, 8, 2, 1000, 128
    q, k, v, do = (x.cuda().bfloat16().double() for x in make_inputs((B, H, H_kv, N, D, causal)))
    want = run(naive, q, k, v, do, torch.float64, causal)
    ours = run(flash_attention, q, k, v, do, torch.bfloat16, causal)
    torch_sdpa = torch.nn.functional.scaled_dot_product_attention
    sdpa = run(lambda *a, causal: torch_sdpa(*a, is_causal=causal, enable_gqa=True),
               q, k, v, do, torch.bfloat16, causal)
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), ours, sdpa, want):
        # bf16 rounding of P, dS and the results dominates: at most twice PyTorch's kernel's error.
        assert (a - w).abs().max() <= 2 * (b - w).abs().max() + 1e-3, name
    # fp32 with exact (not tf32) dots against float64.
    assert_all_close(run(flash_attention, q, k, v, do, torch.float32, causal), want,
                     rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    interpreter_child(sys.argv[1])
