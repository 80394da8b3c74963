"""ddp.py and zero.py against one process on the global batch, at world sizes 2 and 4 (gloo)."""
import contextlib
import io
import json
import os
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import pretrain
import stack
from amp import MixedPrecisionOptimizer
from model import PRESETS, Transformer
from topology import Topology
from tests.distributed import run_distributed

CFG = replace(PRESETS["tiny"], n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64, vocab_size=64,
              block_size=16)
STEPS, GLOBAL_BATCH, GRAD_ACCUM, CLIP = 3, 8, 2, 0.5


def args_for(zero, amp="fp32", bucket_mb=0.01):
    # A tiny bucket size so that the model spans several buckets, as a real model does.
    return pretrain.parse(["--zero", str(zero), "--amp", amp, "--lr", "1e-2",
                           "--bucket-mb", str(bucket_mb)])


def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, CFG.vocab_size, (STEPS, GLOBAL_BATCH, 17), generator=g)


def train(model, module, opt, batches, rank=0, world=1, dp_group=None):
    """STEPS optimizer steps of GRAD_ACCUM micro-steps on this rank's contiguous 1/world of each
    global batch. Returns the global-batch losses and gradient norms (the same on every rank)."""
    losses, norms = [], []
    for batch in batches:
        mine = batch.chunk(world)[rank]
        total = torch.zeros((), dtype=torch.float64)
        micro_batches = mine.chunk(GRAD_ACCUM)
        for i, m in enumerate(micro_batches):
            with opt.no_sync() if i < GRAD_ACCUM - 1 else contextlib.nullcontext():
                _, loss = module(m[:, :-1], m[:, 1:])
                opt.scale_loss(loss / GRAD_ACCUM).backward()
            total += loss.detach() / GRAD_ACCUM
        norm, skipped = opt.step(CLIP)
        assert not skipped
        opt.zero_grad()
        if world > 1:
            dist.all_reduce(total, group=dp_group)
        losses.append(total.item() / world)
        norms.append(norm)
    return losses, norms


def build(seed):
    """The test model in float64, its embedding frozen (as LoRA will freeze weights): only trainable
    parameters may be sharded, reduced and stepped; the frozen one must stay the same everywhere."""
    torch.manual_seed(seed)
    model = Transformer(CFG).double()
    model.tok_emb.weight.requires_grad_(False)
    return model


def reference():
    model = build(0)
    # (computed inside every rank, beside the process group)
    one_process = SimpleNamespace(dp=1, cp=1, dp_group=None, dp_cp_group=None)
    module, opt = stack.build_training(model, args_for(0), torch.float64, one_process)
    # one process: no wrapping at all
    assert isinstance(opt, MixedPrecisionOptimizer) and module is model
    losses, norms = train(model, module, opt, tokens())
    return losses, norms, [p.detach().clone() for p in model.parameters()]


def _parity(rank, world):
    ref_losses, ref_norms, ref_params = reference()
    assert max(ref_norms) > CLIP  # clipping is really at work in this comparison
    topo = Topology()
    out = {}
    for zero in (0, 1, 2, 3):
        # a different start on every rank: the broadcast repairs it
        model = build(0 if rank == 0 else 100 + rank)
        module, opt = stack.build_training(model, args_for(zero), torch.float64, topo)
        losses, norms = train(model, module, opt, tokens(), rank, world, topo.dp_group)
        with opt.gathered() if zero == 3 else contextlib.nullcontext():
            params = [p.detach().clone() for p in model.parameters()]
        out[zero] = {"loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                     "norm": max(abs(a - b) for a, b in zip(norms, ref_norms)),
                     "param": max((a - b).abs().max().item() for a, b in zip(params, ref_params))}
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_and_every_zero_stage_match_one_process(world):
    """Same losses, gradient norms and final weights as one process on the global batch, with
    accumulation and clipping on. float64: the only difference is the order of summation (per-rank
    means averaged vs one mean, and sharded squared norms summed), about 1e-16 relative per
    operation; 1e-10 leaves room for the three steps of Adam, whose update m / sqrt(v) amplifies
    tiny gradient differences near v = 0."""
    for rank_result in run_distributed(_parity, world):
        for zero, diff in rank_result.items():
            assert (diff["loss"] < 1e-10 and diff["norm"] < 1e-10
                    and diff["param"] < 1e-10), (world, zero, diff)


def _against_torch_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as TorchDDP
    from ddp import DistributedDataParallel
    torch.manual_seed(0)
    ours, theirs = Transformer(CFG).double(), Transformer(CFG).double()
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = DistributedDataParallel(ours, bucket_mb=0.01), TorchDDP(theirs)
    x = tokens()[0].chunk(world)[rank]
    for model in (ours, theirs):
        # accumulation: the first micro-step without communication
        for i, m in enumerate(x.chunk(2)):
            with model.no_sync() if i == 0 else contextlib.nullcontext():
                model(m[:, :-1], m[:, 1:])[1].backward()
    return max((a.grad - b.grad).abs().max().item()
               for a, b in zip(ours.parameters(), theirs.parameters()))


def test_our_ddp_gradients_equal_torch_ddp():
    """float64, 2 ranks: a + b rounds once either way; halving first (ours) or after is exact."""
    assert all(d < 1e-15 for d in run_distributed(_against_torch_ddp, 2))


def _fp16_overflow_on_one_rank(rank, world):
    topo = Topology()
    out = {}
    for zero in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = Transformer(CFG)
        from amp import cast_model
        cast_model(model, torch.float16)
        module, opt = stack.build_training(model, args_for(zero, amp="fp16"), torch.float16, topo)
        with opt.gathered() if zero == 3 else contextlib.nullcontext():
            before = [p.detach().clone() for p in model.parameters()]
        x = tokens()[0].chunk(world)[rank]
        _, loss = module(x[:, :-1], x[:, 1:])
        if rank == 1:
            loss = loss * 1e30  # only this rank's gradients overflow fp16
        opt.scale_loss(loss).backward()
        norm, skipped = opt.step(1.0)
        with opt.gathered() if zero == 3 else contextlib.nullcontext():
            unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        out[zero] = (skipped, opt.scaler.scale, unchanged)
    return out


def test_fp16_overflow_on_one_rank_skips_the_step_everywhere():
    for result in run_distributed(_fp16_overflow_on_one_rank, 2):
        for zero, (skipped, scale, unchanged) in result.items():
            assert skipped and scale == 2.0 ** 15 and unchanged, (zero, result)


# ------------------------------------------------------------------------------ through pretrain.py
FAST = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2",
        "--lr", "3e-3", "--warmup-steps", "2", "--eval-iters", "1", "--eval-every", "100",
        "--sample-tokens", "0", "--log-every", "1", "--max-steps", "4"]


def _pretrain_zero3_resume(rank, world, data_dir, out):
    common = FAST + ["--data", str(data_dir), "--zero", "3"]
    whole = pretrain.main(common + ["--out", f"{out}/whole"])
    first = pretrain.main(common + ["--out", f"{out}/split", "--stop-after", "2"])
    second = pretrain.main(common + ["--out", f"{out}/split", "--resume"])
    params = []
    for run in (whole, second):
        with run["opt"].gathered():
            params.append([p.detach().clone() for p in run["model"].parameters()])
    errors = []
    for bad in (["--batch-size", "5"], ["--zero", "4"]):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                pretrain.main(common + ["--out", f"{out}/bad"] + bad)
        except SystemExit as e:
            errors.append((e.code, stderr.getvalue()))
    return {"whole": whole["losses"], "split": first["losses"] + second["losses"],
            "same_params": all(torch.equal(a, b) for a, b in zip(*params)), "exit_codes": errors}


def test_zero3_resume_through_pretrain_is_exact_and_errors_are_clear(tmp_path, stdlib_data, capsys):
    """ZeRO-3 at world 2 in fp32 on CPU: stopping after 2 steps and resuming gives the very same
    losses and weights as the uninterrupted run (every rank restores its slices, its RNG state and
    the data position). Then the bad inputs: a global batch that does not divide over 2 ranks x 2
    micro-steps, --zero 4, and the world-2 checkpoint resumed by one process (another layout)."""
    results = run_distributed(_pretrain_zero3_resume, 2, stdlib_data, str(tmp_path))
    for r in results:
        assert r["whole"] == r["split"] and len(r["whole"]) == 4 and r["same_params"], r
        (code_batch, err_batch), (code_zero, err_zero) = r["exit_codes"]
        assert code_batch == code_zero == 2
        assert err_batch.startswith("pretrain.py: error: --batch-size 5 does not divide into "
                                    "--grad-accum 2 x --microbatches 1 x 2 data-parallel ranks")
        assert "argument --zero: invalid choice: 4 (choose from 0, 1, 2, 3)" in err_zero
    assert sorted(os.listdir(tmp_path / "split")) == [".lock", "latest", "metrics.jsonl",
                                                      "step_000002", "step_000004"]
    # The world-2 ZeRO-3 checkpoint of step 2, resumed by one process: the same losses (fp32,
    # another summation order: 1e-5), and metrics.jsonl holds one history.
    shutil.copytree(tmp_path / "split", tmp_path / "one")
    shutil.rmtree(tmp_path / "one" / "step_000004")
    (tmp_path / "one" / "latest").write_text("step_000002\n")
    one = pretrain.main(FAST + ["--data", str(stdlib_data), "--out", str(tmp_path / "one")])
    assert one["step"] == 4 and one["losses"] == pytest.approx(results[0]["whole"][2:], rel=1e-5)
    steps = [json.loads(l)["step"]
             for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 1


def test_estimate_prints_the_zero_table(capsys):
    est = pretrain.main(["--model", "gpt2-124m", "--estimate", "--gpus", "8"])
    n, rows = est["params"], est["zero"]
    # the ZeRO paper's column
    assert [r["total"] / n for r in rows] == [16, 4 + 12 / 8, 2 + 14 / 8, 16 / 8]
    assert [r["comm_elements"] / (n * 7 / 8) for r in rows] == [2, 3, 2, 3]
    assert "reduce-scatter" in capsys.readouterr().out
