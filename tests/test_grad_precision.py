"""A bf16 model's gradients added up over 8 accumulation micro-steps, then averaged over 4
data-parallel ranks (ddp.py): in fp32 (amp.py's main_grad, the default) or in bf16
(--grad-reduce-dtype model), against the exact sum in float64 of the very bf16 gradients each
micro-step's backward produced. What is measured is the error the accumulation and the reduction
add, nothing else: each backward's own bf16 rounding is the same on both paths.

`python tests/test_grad_precision.py` prints the figures (the relative error of each path)."""
import contextlib
from dataclasses import replace

import torch
import torch.distributed as dist

from amp import DynamicLossScaler, MixedPrecisionOptimizer, cast_model, grad_of
from ddp import DistributedDataParallel
from zero import ZeroOptimizer
from model import PRESETS, Transformer
from tests.distributed import run_distributed

CFG = replace(PRESETS["tiny"], n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128,
              block_size=16, vocab_size=128)
DP, MICRO = 4, 8


def build():
    torch.manual_seed(0)
    return cast_model(Transformer(CFG), torch.bfloat16)


def micro_batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, CFG.vocab_size, (MICRO, 2, CFG.block_size + 1), generator=g)


def backward(module, batch):
    _, loss = module(batch[:, :-1], batch[:, 1:])
    loss.backward()


def exact_sum(ranks):
    """float64 sum of the bf16 gradients of every rank's micro-steps, / the ranks (ddp's mean)."""
    model, total = build(), None
    for rank in ranks:
        for batch in micro_batches(rank):
            backward(model, batch)
            grads = [p.grad.double() for p in model.parameters()]
            total = grads if total is None else [t + g for t, g in zip(total, grads)]
            model.zero_grad()
    return [t / len(ranks) for t in total]


def relative_error(grads, ref):
    return (sum((g.double() - r).pow(2).sum() for g, r in zip(grads, ref))
            / sum(r.pow(2).sum() for r in ref)).sqrt()


def accumulated(main_grads):
    """One process, MICRO micro-steps: the gradient the optimizer would step with."""
    model = build()
    opt = MixedPrecisionOptimizer([{"params": list(model.parameters())}], torch.optim.AdamW,
                                  torch.bfloat16, DynamicLossScaler(enabled=False),
                                  main_grads=main_grads)
    for batch in micro_batches(0):
        backward(model, batch)
    grads = [grad_of(p).clone() for p in model.parameters()]
    opt.zero_grad()
    return grads


def _ddp(rank, world, main_grads):
    model = build()
    ddp = DistributedDataParallel(model, bucket_mb=0.05, main_grads=main_grads)
    MixedPrecisionOptimizer([{"params": list(model.parameters())}], torch.optim.AdamW,
                            torch.bfloat16, DynamicLossScaler(enabled=False), no_sync=ddp.no_sync,
                            main_grads=main_grads)
    for i, batch in enumerate(micro_batches(rank)):
        with ddp.no_sync() if i < MICRO - 1 else contextlib.nullcontext():
            backward(ddp, batch)
    return [grad_of(p).clone() for p in model.parameters()]


def _zero2(rank, world, main_grads):
    """ZeRO-2 reduce-scatters each micro-step's gradients and sums its slices: gathered whole."""
    model = build()
    opt = ZeroOptimizer(model, [{"params": list(model.parameters())}], torch.optim.AdamW,
                        DynamicLossScaler(enabled=False), stage=2, main_grads=main_grads)
    for batch in micro_batches(rank):
        backward(opt.module, batch)
    grads = {}
    for u in opt.units:
        full = torch.empty(u.shard_size * world, dtype=u.grad_shard.dtype)
        dist.all_gather_into_tensor(full, u.grad_shard)
        grads.update({p: full[a:b].view_as(p)
                      for p, a, b in zip(u.params, u.offsets, u.offsets[1:])})
    return [grads[p] for p in model.parameters()]


def measure():
    """{(path, dtype): relative error} for accumulation alone (dp 1) and accumulation + the dp
    reduction (ddp.py, and ZeRO-2)."""
    errors, ref1, ref_dp = {}, exact_sum([0]), exact_sum(range(DP))
    for main_grads, name in ((True, "fp32"), (False, "bf16")):
        errors[("accumulate 8", name)] = relative_error(accumulated(main_grads), ref1).item()
        per_rank = run_distributed(_ddp, DP, main_grads)
        # one mean everywhere
        assert all(torch.equal(a, b) for r in per_rank[1:] for a, b in zip(per_rank[0], r))
        errors[(f"accumulate 8, reduce dp {DP}", name)] = relative_error(per_rank[0], ref_dp).item()
        errors[(f"ZeRO-2, dp {DP}", name)] = relative_error(
            run_distributed(_zero2, DP, main_grads)[0], ref_dp).item()
    return errors


def test_fp32_accumulation_and_reduction_are_far_closer_to_float64_than_bf16():
    errors = measure()
    for what in ("accumulate 8", f"accumulate 8, reduce dp {DP}", f"ZeRO-2, dp {DP}"):
        assert errors[(what, "fp32")] < errors[(what, "bf16")] / 100, errors
        # bf16's 8 bits show (the measurement can see an error)
        assert errors[(what, "bf16")] > 1e-4, errors


def test_fp32_models_have_no_main_grad():
    """fp32 and float64 models keep their gradients in p.grad, in their own dtype (no main_grad)."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    MixedPrecisionOptimizer([{"params": list(model.parameters())}], torch.optim.AdamW,
                            torch.float32, DynamicLossScaler(enabled=False), main_grads=True)
    backward(model, micro_batches(0)[0])
    assert all(not hasattr(p, "main_grad") and p.grad.dtype == torch.float32
               for p in model.parameters())


def model_error(main_grads):
    """For scale: one process's accumulated gradient against the float64 model's (same weights, same
    data), whose error is mostly each backward's own bf16 arithmetic."""
    torch.manual_seed(0)
    model = Transformer(CFG).double()
    model.load_state_dict({k: v.double() for k, v in build().state_dict().items()})
    for batch in micro_batches(0):
        backward(model, batch)
    return relative_error(accumulated(main_grads), [p.grad for p in model.parameters()]).item()


if __name__ == "__main__":
    for (what, dtype), err in measure().items():
        print(f"{what:<28} in {dtype}: relative error {err:.2e} against the float64 sum of the "
              "same bf16 gradients")
    for main_grads, dtype in ((True, "fp32"), (False, "bf16")):
        print(f"accumulate 8 in {dtype}, against the float64 model's gradient: "
              f"{model_error(main_grads):.2e}")
