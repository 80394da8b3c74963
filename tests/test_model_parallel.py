"""Tensor and pipeline parallelism against one process: same model, data and seed; losses, gradient
norms (clipping active) and final parameters after several AdamW steps of gradient accumulation."""
import contextlib
import os
import shutil
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import pipeline
import pretrain
import stack
import training
import tensor_parallel
from amp import grad_of
from model import PRESETS, Transformer
from moe import add_moe
from tests.distributed import refused_before_any_group, run_distributed
from topology import Topology

# 4 layers (4 stages possible), GQA with 2 query heads per KV head, d_ff and vocab divisible by 4.
CFG = replace(PRESETS["tiny"], n_layer=4, d_model=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=64,
              block_size=16)
STEPS, N_MICRO, MICRO_BS, CLIP = 3, 4, 2, 0.05  # 4 micro-batches of 2 x 16 tokens per step


def micro_batches(step):
    g = torch.Generator().manual_seed(step)
    seq = torch.randint(0, CFG.vocab_size, (N_MICRO * MICRO_BS, CFG.block_size + 1), generator=g)
    # some ignored labels: the parallel cross-entropy must skip them as F.cross_entropy does
    seq[0, 5:9] = -100
    x, y = seq[:, :-1].clamp(min=0), seq[:, 1:]
    return list(zip(x.chunk(N_MICRO), y.chunk(N_MICRO)))


def full_name(name, model):
    """Stage-local 'blocks.i.' -> the full model's 'blocks.{first_layer + i}.'."""
    if name.startswith("blocks."):
        i, rest = name[len("blocks."):].split(".", 1)
        return f"blocks.{int(i) + model.first_layer}.{rest}"
    return name


def train(topo, cfg=CFG, schedule="1f1b", zero=0, sp=False):
    """stack.py's and training.py's pieces, in float64: the model cut and sliced, the optimizer (DDP
    or ZeRO over dp) with clipping and the norm reduction, the step function. Each data-parallel
    rank takes its contiguous share of the micro-batches, so that the mean of the ranks' means is
    the one process's mean."""
    model = stack.build_model(cfg, topo, seed=0, device=torch.device("cpu"), dtype=torch.float64,
                              sequence_parallel=sp)
    config = pretrain.parse(["--zero", str(zero), "--lr", "1e-2", "--weight-decay", "0.1",
                             "--bucket-mb", "0.01"])
    module, opt = stack.build_training(model, config, torch.float64, topo)
    losses, norms = [], []
    for step in range(STEPS):
        mine = micro_batches(step)[topo.dp_rank * N_MICRO // topo.dp:
                                   (topo.dp_rank + 1) * N_MICRO // topo.dp]
        loss = training.forward_backward(model if topo.pp > 1 else module, mine, topo, schedule,
                                         opt.scale_loss, "cpu", opt.no_sync)
        norm, _ = opt.step(CLIP)
        opt.zero_grad()
        losses.append(training.mean_over_dp(loss, topo).item())
        norms.append(norm)
    with opt.gathered() if zero == 3 and topo.dp > 1 else contextlib.nullcontext():
        params = {full_name(n, model): p.detach().clone() for n, p in model.named_parameters()}
    return losses, norms, params


def _parallel(rank, world, layouts, cfg):
    """Layouts (tp, pp, schedule, zero, sp) in turn on one world; each builds its own groups."""
    out = []
    for tp, pp, schedule, zero, sp in layouts:
        topo = Topology(tp=tp, pp=pp)
        out.append((topo.tp_rank, tp, train(topo, cfg, schedule, zero, sp)))
    return out


def check_against_one_process(layouts, world, cfg=CFG):
    ref_losses, ref_norms, ref_params = train(Topology(), cfg)
    # clipping is active in every step, so a wrong global norm would show
    assert min(ref_norms) > CLIP
    # (name, tp slice) held by some rank, per layout
    covered = {layout: set() for layout in layouts}
    for rank_results in run_distributed(_parallel, world, layouts, cfg):
        for layout, (tp_rank, tp, (losses, norms, params)) in zip(layouts, rank_results):
            # float64, the same arithmetic up to summation order (partial matmuls summed by
            # all-reduce, per-rank squared norms summed): 3 Adam steps keep agreement near 1e-13;
            # the tolerances leave a margin.
            assert losses == pytest.approx(ref_losses, rel=1e-11), layout
            assert norms == pytest.approx(ref_norms, rel=1e-10), layout
            for name, p in params.items():
                d = tensor_parallel.split_dim(name)
                want = ref_params[name] if d is None else ref_params[name].chunk(tp, dim=d)[tp_rank]
                torch.testing.assert_close(p, want, rtol=1e-9, atol=1e-11, msg=f"{layout} {name}")
                covered[layout].add((name, tp_rank if d is not None else 0))
    # every parameter, every slice of it, somewhere
    for layout, tp in ((layout, layout[0]) for layout in layouts):
        assert covered[layout] == {(n, r) for n in ref_params
                                   for r in (range(tp) if tensor_parallel.split_dim(n) is not None
                                             else [0])}, layout


@pytest.mark.parametrize("tp, pp, schedule, sp", [(2, 1, "1f1b", False), (4, 1, "1f1b", False),
                                                  (1, 2, "gpipe", False), (1, 2, "1f1b", False),
                                                  (1, 4, "1f1b", False), (2, 2, "gpipe", False),
                                                  (2, 2, "1f1b", True)])
def test_parallel_training_matches_one_process(tp, pp, schedule, sp):
    """tp, pp, both, and (last) both with sequence parallelism."""
    # tp 4 needs 4 KV heads: one query and one KV head each
    cfg = replace(CFG, n_kv_head=4) if tp == 4 else CFG
    check_against_one_process([(tp, pp, schedule, 0, sp)], tp * pp, cfg)


def test_every_zero_stage_with_tp2_and_with_pp2():
    """World 4 = dp 2 x tp 2 with DDP and ZeRO 1, 2, 3 (and ZeRO-3 with sequence parallelism); then
    dp 2 x pp 2 with each (and ZeRO-3 under GPipe, whose last stage holds several micro-batches
    before any backward). The data-parallel reductions must stay inside the dp group and the norm
    must add the dp shards, tp slices and stages."""
    check_against_one_process([(2, 1, "1f1b", z, False) for z in range(4)]
                              + [(2, 1, "1f1b", 3, True)]
                              + [(1, 2, "1f1b", z, False) for z in range(4)]
                              + [(1, 2, "gpipe", 3, False)], 4)


def test_zero1_and_zero3_with_tp2_pp2_on_eight_ranks():
    """World 8 = dp 2 x pp 2 x tp 2: every axis at once, with ZeRO-1 and with ZeRO-3."""
    check_against_one_process([(2, 2, "1f1b", 1, False), (2, 2, "1f1b", 3, False)], 8)


def _backward_all_reduces(rank, world, experts=0):
    """All-reduces issued by one tensor-parallel backward (tp = world), counted in a wrapper."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    if experts:
        add_moe(model, experts, top_k=2)
    tensor_parallel.parallelize(model.double(), Topology(tp=world))
    x, y = micro_batches(0)[0]
    _, loss = model(x, y)
    calls, real = [], dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: calls.append(t.shape) or real(t, *a, **k)
    try:
        loss.backward()
    finally:
        dist.all_reduce = real
    return len(calls)


def test_tensor_parallel_backward_does_two_all_reduces_per_block():
    """Megatron's count: f once before wq, wk, wv (not once each), once before w1, w3; plus the
    head's f. With MoE MLPs of 4 experts, f once per expert's input (not for w1, again for w3)."""
    assert run_distributed(_backward_all_reduces, 2) == [2 * CFG.n_layer + 1] * 2
    assert run_distributed(_backward_all_reduces, 2, 4) == [(1 + 4) * CFG.n_layer + 1] * 2


def test_vocab_parallel_cross_entropy_equals_the_gathered_one():
    """The loss function alone, no communication (group None): one rank holds the whole vocab."""
    torch.manual_seed(0)
    logits = torch.randn(12, 64, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 64, (12,))
    targets[3] = -100
    ours = tensor_parallel.vocab_parallel_loss_fn(0, None)(logits, targets)
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-15)


def test_schedules():
    assert pipeline.make_schedule("gpipe", 3, 2, 0) == [("F", 0), ("F", 1), ("F", 2), ("B", 0),
                                                        ("B", 1), ("B", 2)]
    # 1F1B on 4 stages: stage 0 warms up with 3 forwards, the last stage alternates from the start.
    assert pipeline.make_schedule("1f1b", 4, 4, 0)[:5] == [("F", 0), ("F", 1), ("F", 2), ("F", 3),
                                                           ("B", 0)]
    assert pipeline.make_schedule("1f1b", 4, 4, 3)[:4] == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    for m, p in ((1, 4), (8, 4), (3, 2)):
        for s in range(p):
            for kind in pipeline.SCHEDULES:
                ops = pipeline.make_schedule(kind, m, p, s)
                assert sorted(ops) == sorted([("F", i) for i in range(m)]
                                             + [("B", i) for i in range(m)])
                # in flight = forwards whose backward has not run: 1F1B caps it at p - s, GPipe at m
                flight = max(sum(1 for o, _ in ops[:k + 1] if o == "F")
                             - sum(1 for o, _ in ops[:k + 1] if o == "B")
                             for k in range(len(ops)))
                assert flight == (min(m, p - s) if kind == "1f1b" else m)
    assert [pipeline.stage_layers(10, 4, s) for s in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


# -------------------------------------------------------------------------------------- pretrain.py
def test_check_divisible_names_the_dimension():
    assert tensor_parallel.check_divisible(CFG, 2) is None
    assert "n_head 4" in tensor_parallel.check_divisible(CFG, 8)
    assert "n_kv_head 2" in tensor_parallel.check_divisible(CFG, 4)
    assert "d_ff 90" in tensor_parallel.check_divisible(replace(CFG, d_ff=90, n_kv_head=4), 4)
    assert "vocab_size (padded) 64" in tensor_parallel.check_divisible(
        replace(CFG, n_head=3, n_kv_head=3, d_ff=48), 3)


@pytest.mark.parametrize("world, flags, message", [
    (6, ["--tp", "4"], "world size 6 is not divisible by --tp 4 x --pp 1"),
    (8, ["--tp", "8"], "--tp 8 does not divide the model's n_head 4"),
    (4, ["--tp", "4"], "--tp 4 does not divide the model's n_kv_head 2"),
    (8, ["--pp", "8"], "--pp 8 is more stages than the 4 layers of model 'tiny'"),
    (2, ["--pp", "2", "--microbatches", "3"],
     "does not divide into --grad-accum 1 x --microbatches 3"),
    (1, ["--microbatches", "0"], "--microbatches must be at least 1"),
    (2, ["--pp", "2", "--compile"], "--compile with --pp > 1"),
    (2, ["--tp", "2", "--sequence-parallel", "--seq-len", "15"],
     "choose a --seq-len divisible by 2"),
])
def test_invalid_topologies_fail_before_any_process_group(tmp_path, capsys, monkeypatch, world,
                                                          flags, message):
    err = refused_before_any_group(tmp_path, capsys, monkeypatch, world, flags)
    assert message in err, err


FAST = ["--model", "tiny", "--seq-len", "16", "--batch-size", "8", "--lr", "3e-3",
        "--warmup-steps", "2", "--eval-iters", "1", "--eval-every", "100", "--log-every", "1",
        "--grad-accum", "2", "--grad-clip", "0.5"]


def _pretrain_runs(rank, world, out, cache):
    os.environ["LLM_DATA_CACHE"] = cache
    z3 = FAST + ["--zero", "3", "--tp", "2", "--max-steps", "4"]  # dp 2 x tp 2
    # all 4 ranks sample in step
    whole = pretrain.main(z3 + ["--sample-tokens", "8", "--out", f"{out}/whole"])
    first = pretrain.main(z3 + ["--sample-tokens", "0", "--stop-after", "2",
                                "--out", f"{out}/split"])
    if rank == 0:  # the run as it was at step 2, to resume on another layout below
        shutil.copytree(f"{out}/split", f"{out}/split-dp4")
    second = pretrain.main(z3 + ["--sample-tokens", "0", "--resume", "--out", f"{out}/split"])
    with whole["opt"].gathered(), second["opt"].gathered():
        same = all(torch.equal(a, b) for a, b in zip(whole["model"].parameters(),
                                                     second["model"].parameters()))
    pp = pretrain.main(FAST + ["--tp", "2", "--pp", "2", "--microbatches", "2", "--max-steps", "4",
                               "--sample-tokens", "0", "--out", f"{out}/pp"])
    dist.barrier()
    dp4 = pretrain.main(FAST + ["--zero", "3", "--max-steps", "4", "--sample-tokens", "0",
                                "--resume", "--out", f"{out}/split-dp4"])
    return whole["losses"], first["losses"] + second["losses"], same, pp["losses"], dp4["losses"]


def test_pretrain_zero3_tp2_and_tp2_pp2_match_one_process_and_resume(tmp_path, stdlib_data,
                                                                      data_cache):
    """Through pretrain.py at world 4, fp32: ZeRO-3 x tp 2 and tp 2 x pp 2 against one process (the
    same global batch cut into the same 4 micro-batches); ZeRO-3 x tp 2 stopped after 2 steps and
    resumed equals the uninterrupted run exactly; its step-2 checkpoint resumed on dp 4 (ZeRO-3, no
    tp) goes on alike."""
    one = pretrain.main(FAST + ["--max-steps", "4", "--microbatches", "2", "--sample-tokens", "0",
                                "--out", str(tmp_path / "one")])
    for whole, resumed, same_params, pp, dp4 in run_distributed(_pretrain_runs, 4, str(tmp_path),
                                                                str(data_cache)):
        # fp32 with another summation order: agreement to float32 rounding, amplified over 4 steps
        assert whole == pytest.approx(one["losses"], rel=1e-4)
        assert pp == pytest.approx(one["losses"], rel=1e-4)
        assert resumed == whole and same_params  # resuming on the same topology is exact
        # resumed on another layout: fp32 rounding apart
        assert dp4 == pytest.approx(whole[2:], rel=1e-4)
    assert (tmp_path / "whole" / "sample.txt").read_text().startswith("def ")


def _fp16_overflow_on_rank0(rank, world):
    """An inf in rank 0's gradients only (its own stage and slice, or its own ZeRO shard), after the
    backward: the norm reduction must carry it to every rank, so that every rank skips the step and
    halves the scale."""
    out = []
    for tp, pp, zero in ((2, 2, 0), (2, 1, 2)):
        topo = Topology(tp=tp, pp=pp)
        model = stack.build_model(CFG, topo, seed=0, device=torch.device("cpu"),
                                  dtype=torch.float16)
        config = pretrain.parse(["--zero", str(zero), "--amp", "fp16"])
        module, opt = stack.build_training(model, config, torch.float16, topo)
        before = [p.detach().clone() for p in model.parameters()]
        mine = micro_batches(0)[topo.dp_rank * N_MICRO // topo.dp:
                                (topo.dp_rank + 1) * N_MICRO // topo.dp]
        training.forward_backward(model if pp > 1 else module, mine, topo, "1f1b", opt.scale_loss,
                                  "cpu", opt.no_sync)
        if rank == 0:
            if zero >= 2:
                opt.units[0].grad_shard[0] = float("inf")
            else:
                # the fp32 main_grad of the fp16 weight
                grad_of(next(model.parameters()))[0, 0] = float("inf")
        _, skipped = opt.step(1.0)
        with opt.gathered() if zero == 3 else contextlib.nullcontext():
            unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        out.append((skipped, opt.scaler.scale, unchanged))
    return out


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank():
    for result in run_distributed(_fp16_overflow_on_rank0, 4):
        assert result == [(True, 2.0 ** 15, True)] * 2, result
