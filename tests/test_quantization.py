"""quantization.py: FP8 casts and matmuls at the bounds their formats' epsilons give, INT8
per-channel PTQ (and int8_eval.py's report on a checkpoint), FP8 under tensor parallelism and ZeRO-3
against one process."""
import contextlib
import math
import re
from dataclasses import asdict, replace

import pytest
import torch

import int8_eval
import quantization as q
import tensor_parallel
from amp import DynamicLossScaler, MixedPrecisionOptimizer
from model import PRESETS, ModelConfig, Transformer
from tests import cuda_rules
from tests.cuda_rules import strict_scaled_mm
from tests.distributed import run_distributed
from topology import Topology

E4M3, E5M2 = q.E4M3, q.E5M2
CFG = replace(PRESETS["tiny"], n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, vocab_size=64,
              block_size=16)


def test_format_table_is_read_from_finfo():
    rows = {r[0]: r[1:5] for r in q.format_table()}
    assert rows["fp32"] == (32, 8, 23, torch.finfo(torch.float32).max)
    assert rows["bf16"][:3] == (16, 8, 7) and rows["fp16"][:3] == (16, 5, 10)
    assert rows["fp8 e4m3"] == (8, 4, 3, 448.0) and rows["fp8 e5m2"] == (8, 5, 2, 57344.0)
    assert rows["int8"] == (8, None, None, 127)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_cast_error_is_at_most_and_close_to_unit_roundoff(fmt):
    """Values over 12 binades (inside both formats' normal range once scaled): every entry's
    relative error is at most u = eps/2, and the largest is above 0.85 u (its supremum, just above a
    power of two, is u/(1+u))."""
    g = torch.Generator().manual_seed(0)
    x = torch.exp2(torch.rand(50_000, generator=g) * 12) * torch.randn(50_000, generator=g).sign()
    xq, inv = q.to_fp8(x, fmt)
    rel = ((xq.float() * inv - x).abs() / x.abs()).max().item()
    u = q.unit_roundoff(fmt)
    assert 0.85 * u < rel <= u, (rel, u)


def test_current_scaling_never_overflows_over_twelve_decades():
    """amax from 1e-6 to 1e6: the scaled amax lands in the format's top binade (no overflow, no
    saturation, at most one binade unused), the largest entry survives within u, and an all-zero
    tensor stays finite."""
    g = torch.Generator().manual_seed(0)
    for fmt in (E4M3, E5M2):
        fmax, u = torch.finfo(fmt).max, q.unit_roundoff(fmt)
        for amax in torch.logspace(-6, 6, 25).tolist():
            x = torch.randn(1000, generator=g)
            x = x / x.abs().max() * amax
            xq, inv = q.to_fp8(x, fmt)
            back = xq.float() * inv
            assert (torch.isfinite(back).all()
                    and fmax / 2 <= xq.float().abs().max() <= fmax), (fmt, amax)
            i = x.abs().argmax()
            assert abs(back[i] - x[i]) <= u * abs(x[i]), (fmt, amax)
        zq, zinv = q.to_fp8(torch.zeros(8), fmt)
        assert torch.isfinite(zinv) and (zq.float() == 0).all()


def one_hot_rows(m, k, g, binades):
    """One nonzero per row, at a random column, magnitude 2^-U(0, binades): each output entry of a
    matmul against it is a single product, whose error reaches the bound (no cancellation averages
    it away)."""
    t = torch.zeros(m, k)
    t[torch.arange(m), torch.randint(0, k, (m,), generator=g)] = \
        torch.exp2(-binades * torch.rand(m, generator=g)) * torch.randn(m, generator=g).sign()
    return t


def check_linear(x, w, gy, out_dtype):
    """fp8_linear's output and both gradients against float64: the largest error / bound of each."""
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    q.fp8_linear(xl, wl).backward(gy)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    y = xr @ wr.t()
    y.backward(gy.double())
    ratios = []
    for got, ref, a, b, fa, fb in ((q.fp8_linear(x, w), y.detach(), x, w, E4M3, E4M3),
                                   (xl.grad, xr.grad, gy, w.t(), E5M2, E4M3),
                                   (wl.grad, wr.grad, gy.t(), x.t(), E5M2, E4M3)):
        bound = q.matmul_error_bound(a, b, fa, fb, out_dtype)
        err = (got.double() - ref).abs()
        assert (err <= bound).all(), (err / bound).max()
        ratios.append((err / bound.clamp(min=1e-300)).max().item())
    return ratios


def test_fp8_linear_forward_and_backward_within_the_epsilon_bound():
    """Y = X W^T (E4M3 x E4M3), dX = dY W and dW = dY^T X (E5M2 x E4M3), entry by entry within
        e_a (|b| + e_b) + |a| e_b   (+ fp32 accumulation and output rounding),
        e = u (|t| + smallest normal / scale),   u from each format's epsilon.
    One-hot rows make single-product entries, so the bound is nearly reached (checked: a looser test
    would pass a coarser format); dY spans 16 binades, which E5M2 holds and E4M3 would flush. Then
    dense bf16 tensors, as in training."""
    g = torch.Generator().manual_seed(0)
    x, w, gy = (one_hot_rows(256, 32, g, 8), torch.randn(48, 32, generator=g),
                one_hot_rows(256, 48, g, 16))
    assert min(check_linear(x, w, gy, torch.float32)) > 0.6
    x, w, gy = (torch.randn(*s, generator=g).bfloat16() for s in ((64, 64), (48, 64), (64, 48)))
    check_linear(x, w, gy, torch.bfloat16)


def test_strict_scaled_mm_refuses_what_cuda_refuses():
    """The CPU stand-in for CUDA's checks (tests/cuda_rules.py, on for every test) raises on each
    broken rule and otherwise returns the real kernel's result."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*s, generator=g).to(E4M3) for s in ((7, 32), (48, 32)))
    one = torch.ones(())
    ok = dict(scale_a=one, scale_b=one, out_dtype=torch.float32)
    # M = 7 is free
    assert torch.equal(strict_scaled_mm(a, b.t(), **ok), cuda_rules._scaled_mm(a, b.t(), **ok))
    assert strict_scaled_mm(a[:0], b.t(), **ok).shape == (0, 48)
    broken = {"divisible by 16": (a[:, :24], b[:, :24].t(), ok),
              "mat2 shape (32x40)": (a, b[:40].t(), ok),
              "row-major and column-major": (a, b.t().contiguous(), ok),
              "two Float8_e5m2": (a.to(E5M2), b.t().to(E5M2), ok),
              "scale_a must have 1 Float": (a, b.t(), {**ok, "scale_a": one.double()})}
    for message, (m1, m2, kw) in broken.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            strict_scaled_mm(m1, m2, **kw)


@pytest.mark.parametrize("m,k,n", [(7, 40, 40), (0, 32, 48), (13, 24, 8), (1, 16, 16)])
def test_fp8_linear_pads_ragged_shapes_to_the_same_result(m, k, n):
    """Any token count m (the weight gradient's K), width k and output count n (a tensor-parallel
    slice) runs under CUDA's rules, and the zero padding changes nothing: output and gradients
    equal, bit for bit, the unpadded products of the same 8-bit values and scales (the CPU kernel
    takes the ragged shapes)."""
    g = torch.Generator().manual_seed(m + k + n)
    x, w, gy = (torch.randn(*s, generator=g).bfloat16() for s in ((m, k), (n, k), (m, n)))
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = q.fp8_linear(xl, wl)
    y.backward(gy)
    (xq, xs), (wq, ws), (gq, gs) = q.to_fp8(x, E4M3), q.to_fp8(w, E4M3), q.to_fp8(gy, E5M2)
    mm = cuda_rules._scaled_mm  # the CPU kernel, no rules
    ref_y = mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)
    ref_dx = mm(gq, wq, scale_a=gs, scale_b=ws, out_dtype=torch.bfloat16)
    ref_dw = mm(gq.t(), xq, scale_a=gs, scale_b=xs, out_dtype=torch.bfloat16)
    for got, want in ((y, ref_y), (xl.grad, ref_dx), (wl.grad, ref_dw)):
        assert got.shape == want.shape and torch.equal(got.detach(), want), (got, want)


def test_moe_experts_with_no_rows_and_seven_rows_run_in_fp8():
    """Routing decides an expert's rows: 0 (no max() to take an amax from) or 7 (the weight
    gradient's K). Each expert's output and weight gradient within 0.1 relative of fp32 (8-bit
    inputs), the idle expert's zero."""
    import copy

    from moe import MoE
    torch.manual_seed(0)
    ref = MoE(CFG, n_experts=4, top_k=1)
    fp8 = copy.deepcopy(ref)
    assert q.use_fp8(fp8) == 4 * 3  # the experts' w1, w2, w3; the router stays
    counts = torch.tensor([7, 0, 16, 9])
    xs = torch.randn(int(counts.sum()), CFG.d_model)
    outs = []
    for moe in (ref, fp8):
        y = moe.run_experts(xs, counts)
        y.backward(torch.ones_like(y))
        outs.append(y.detach())
    assert ((outs[1] - outs[0]).norm() / outs[0].norm()).item() < 0.1
    for e, (a, b) in enumerate(zip(ref.experts, fp8.experts)):
        if counts[e] == 0:
            assert b.w1.weight.grad is None or not b.w1.weight.grad.any()
        else:
            assert ((b.w1.weight.grad - a.w1.weight.grad).norm()
                    / a.w1.weight.grad.norm()).item() < 0.1, e


def test_sft_in_fp8_with_micro_batches_of_any_token_count(tmp_path):
    """sft.py pads each micro-batch to its longest example: 2 rows of 40-odd tokens, whose count the
    weight gradient sums over. Three steps under CUDA's rules; the loss is finite and moves."""
    import sft
    from tests.sft_fixtures import make_init, reverse_examples, write_jsonl
    out = sft.main(["--init", str(make_init(tmp_path / "init")), "--data",
                    str(write_jsonl(tmp_path / "t.jsonl", reverse_examples(16))), "--out",
                    str(tmp_path / "o"), "--batch-size", "4", "--grad-accum", "2", "--max-steps",
                    "3", "--samples", "0", "--amp", "fp8", "--lr", "3e-3", "--warmup-steps", "1"])
    assert any(type(m).__name__ == "Fp8Linear" for m in out["model"].modules())
    assert (all(torch.isfinite(torch.tensor(out["losses"])))
            and out["losses"][-1] != out["losses"][0])


def test_int8_per_channel_error_is_half_a_step_of_each_row():
    """Rows six decades apart: each row's error is at most its own s_j / 2 (a per-tensor scale would
    give the small rows the large rows' step), its largest entry maps to +-127; and Int8Linear
    computes x (q s)^T."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g) * torch.logspace(-3, 3, 32).unsqueeze(1)
    wq, s = q.quantize_int8(w)
    assert wq.dtype == torch.int8 and (wq.abs().amax(dim=1) == 127).all()
    assert ((wq.float() * s[:, None] - w).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()
    lin = torch.nn.Linear(64, 32, bias=False)
    lin.weight.data = w
    x = torch.randn(5, 64, generator=g)
    torch.testing.assert_close(q.Int8Linear(lin, torch.float32)(x),
                               x @ (wq.float() * s[:, None]).t(), rtol=1e-5,
                               atol=1e-5 * s.max().item())


def test_eval_command_reports_int8_beside_bf16(tmp_path, stdlib_data, capsys):
    """A checkpoint of the tiny-shaped test model: the command runs, the int8 model's bytes are the
    linears at 1 byte (+ one bf16 scale per row) and the rest at 2, and its loss is close to bf16's.
    A missing checkpoint is one line."""
    torch.manual_seed(0)
    model = Transformer(replace(CFG, vocab_size=256))
    torch.save({"model": model.state_dict(), "model_config": asdict(replace(model.cfg, attn="-")),
                "tokenizer": "bytes"}, tmp_path / "model.pt")  # a consolidated file
    rows = int8_eval.evaluate([str(tmp_path / "model.pt"), "--eval-iters", "1", "--batch-size",
                               "2", "--gen-tokens", "4", "--repeats", "1"])
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    other = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in linear)
    assert rows["int8"][1] == sum(p.numel() + 2 * p.shape[0] for p in linear) + 2 * other
    assert rows["bf16"][1] == 2 * sum(p.numel() for p in model.parameters())
    assert abs(rows["int8"][0] - rows["bf16"][0]) < 0.05
    assert "int8 vs bf16" in capsys.readouterr().out
    with pytest.raises(int8_eval.EvalError, match="no such file or folder"):
        int8_eval.evaluate([str(tmp_path / "missing")])


def test_pretrain_amp_fp8_trains_fp8_layers_and_saves_plain_keys(tmp_path, stdlib_data):
    """--amp fp8 end to end: bf16 parameters with fp32 masters, every Linear but none other swapped,
    the loss falls, and the checkpoint's keys are a plain model's (model.py's Transformer loads
    it)."""
    import pretrain
    out = pretrain.main(["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3",
                         "--warmup-steps", "1", "--eval-iters", "1", "--sample-tokens", "0",
                         "--max-steps", "6", "--amp", "fp8", "--out", str(tmp_path)])
    model = out["model"]
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Fp8Linear" in kinds and "Linear" not in kinds
            and next(model.parameters()).dtype == torch.bfloat16)
    assert out["losses"][-1] < out["losses"][0] - 0.5, out["losses"]
    from weights import load_weights
    ckpt = load_weights(tmp_path)  # the whole model from the run's folder
    Transformer(ModelConfig(**{**ckpt["model_config"], "attn": "sdpa"})).load_state_dict(
        ckpt["model"])


def test_fp8_refused_in_one_line_where_scaled_mm_is_missing(tmp_path, capsys, monkeypatch):
    from tests.distributed import refused_before_any_group
    assert q.fp8_unsupported("cpu") is None
    monkeypatch.delattr(torch, "_scaled_mm")
    msg = q.fp8_unsupported("cpu")
    assert msg.startswith("--amp fp8:") and "_scaled_mm" in msg and "\n" not in msg
    assert ("--amp fp8: this torch has no FP8 matmul"
            in refused_before_any_group(tmp_path, capsys, monkeypatch, 2, ["--amp", "fp8"]))


# ----------------------------------------------------------------------------- composition
def batch(step=0):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, CFG.vocab_size, (4, CFG.block_size + 1), generator=g)


def uneven_model():
    """The test model with the first half of every split weight 8x larger: the two tp ranks' shards
    then have amaxes in different binades, so per-shard scales differ from the whole tensor's
    (power-of-two scales would give shards of like range one scale and hide the difference)."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (d := tensor_parallel.split_dim(name)) is not None:
                p.narrow(d, 0, p.shape[d] // 2).mul_(8)
    return model


def _tp_against_one_process(rank, world):
    """fp32 model, fp8 matmuls. tp 2 with amax all-reduced over tp: the same scales, hence the same
    8-bit values, as one process; what differs is the order of the fp32 sums (row-parallel partial
    products added by the all-reduce). Per-shard scales (the default) quantize differently, within
    the formats' error."""
    full = uneven_model()
    q.use_fp8(full)
    seq = batch()
    _, ref_loss = full(seq[:, :-1], seq[:, 1:])
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in full.named_parameters()}
    topo = Topology(tp=world)
    out = {}
    for amax_group in (topo.tp_group, None):
        model = tensor_parallel.parallelize(uneven_model(), topo)
        assert q.use_fp8(model, amax_group) == CFG.n_layer * 7 + 1
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        grad_err = 0.0
        for n, p in model.named_parameters():
            d = tensor_parallel.split_dim(n)
            want = ref[n] if d is None else ref[n].chunk(world, dim=d)[rank]
            grad_err = max(grad_err, ((p.grad - want).norm() / want.norm()).item())
        out["reduced" if amax_group is not None else "per shard"] = (
            abs(loss.item() - ref_loss.item()), grad_err)
    return out


def test_fp8_under_tp2_matches_one_process():
    """Reduced amax: loss within fp32 rounding (1e-6), every gradient within 1e-5 relative (fp32
    summation order). Per-shard scales: power-of-two scales round an entry of the normal range alike
    whatever the scale, so they differ only in which entries fall below the smallest normal: close
    (1e-2), but visibly not the same computation (on the rank whose shard is 8x smaller)."""
    results = run_distributed(_tp_against_one_process, 2)
    for r in results:
        assert r["reduced"][0] < 1e-6 and r["reduced"][1] < 1e-5, r
        assert r["per shard"][0] < 1e-2 and r["per shard"][1] < 1e-2, r
    assert (max(r["per shard"][1] for r in results)
            > 100 * max(r["reduced"][1] for r in results)), results


def _step(model, module, opt, micro):
    for i, m in enumerate(micro):
        with opt.no_sync() if i < len(micro) - 1 else contextlib.nullcontext():
            _, loss = module(m[:, :-1], m[:, 1:])
            (loss / len(micro)).backward()
    opt.step(max_norm=1.0)
    opt.zero_grad()


def _zero_against_one_process(rank, world):
    """ZeRO stages 1-3 over 2 ranks, each a half of the batch, against one process taking the halves
    as 2 accumulation steps: activations are scaled per micro-batch alike, and ZeRO-3 gathers whole
    weights, so every 8-bit value is the same; only the order of the gradient sums may differ
    (stage 1 runs ddp.py's all-reduce)."""
    from zero import ZeroOptimizer

    def make(groups):
        return torch.optim.AdamW(groups, lr=1e-2)

    torch.manual_seed(0)
    ref = Transformer(CFG)
    q.use_fp8(ref)
    opt = MixedPrecisionOptimizer([{"params": list(ref.parameters())}], make, torch.float32,
                                  DynamicLossScaler(False))
    for step in range(2):
        _step(ref, ref, opt, batch(step).chunk(2))
    out = {}
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = Transformer(CFG)
        q.use_fp8(model)
        zopt = ZeroOptimizer(model, [{"params": list(model.parameters())}], make,
                             DynamicLossScaler(False), None, stage, 0.01)
        for step in range(2):
            _step(model, zopt.module, zopt, [batch(step).chunk(2)[rank]])
        with zopt.gathered() if stage == 3 else contextlib.nullcontext():
            out[stage] = max(((a - b).abs().max() / b.abs().max()).item()
                             for a, b in zip(model.parameters(), ref.parameters()))
    return out


def test_fp8_under_zero_1_2_3_matches_one_process():
    """Two AdamW steps; 1e-5 relative: fp32 summation order through Adam's m / sqrt(v)."""
    for r in run_distributed(_zero_against_one_process, 2):
        assert all(d < 1e-5 for d in r.values()), r


def _ragged_layouts(rank, world, out):
    """Two fp8 steps of pretrain.py on each layout whose matmuls see ragged shapes: cp 2 (each rank
    6 of a row's 12 tokens: the weight gradient's K), experts over ep 2 (any row count per expert,
    0 included), tp 2."""
    import pretrain
    common = ["--model", "tiny", "--seq-len", "12", "--batch-size", "2", "--max-steps", "2",
              "--warmup-steps", "1", "--eval-iters", "1", "--eval-every", "2", "--sample-tokens",
              "0", "--amp", "fp8"]
    losses = {}
    for name, flags in (("cp", ["--cp", "2", "--attn", "flash", "--batch-size", "1"]),
                        ("ep", ["--experts", "4", "--ep", "2"]), ("tp", ["--tp", "2"])):
        losses[name] = pretrain.main(common + flags + ["--out", f"{out}/{name}"])["losses"]
    return losses


def test_fp8_runs_under_cudas_rules_with_cp_ep_and_tp(tmp_path, stdlib_data):
    for r in run_distributed(_ragged_layouts, 2, str(tmp_path)):
        assert all(len(v) == 2 and all(map(math.isfinite, v)) for v in r.values()), r
