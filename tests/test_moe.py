"""MoE: routing rules, and expert parallelism over all-to-all against one process."""
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from model import PRESETS, Transformer
from moe import MoE, MoEError, add_moe, aux_loss, check_moe, moe_layers, reduce_expert_grads, shard_experts
from tests.distributed import run_distributed

CFG = replace(PRESETS["tiny"], n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=48, vocab_size=64, block_size=16)
E, K, STEPS, PER_RANK = 4, 2, 3, 2


def test_bad_settings_are_refused():
    with pytest.raises(MoEError, match="--experts 6 is not divisible by --ep 4"):
        check_moe(6, 2, None, ep=4)
    with pytest.raises(MoEError, match="--topk 5 must be between 1 and --experts 4"):
        check_moe(4, 5, None)
    with pytest.raises(MoEError, match="--capacity-factor must be > 0"):
        check_moe(4, 2, 0.0)


def test_routing_gates_capacity_and_balance_loss():
    torch.manual_seed(0)
    moe = MoE(CFG, n_experts=E, top_k=K, capacity_factor=None).double()
    x = torch.randn(2, 8, CFG.d_model, dtype=torch.float64)
    y = moe(x)
    # dropless: the output is the gate-weighted sum of each token's top-k experts, computed by hand
    probs = torch.softmax(moe.router(x.view(-1, CFG.d_model)), -1)
    top_p, top_e = probs.topk(K, -1)
    ref = torch.stack([sum(top_p[t, j] / top_p[t].sum() * moe.experts[top_e[t, j]](x.view(-1, CFG.d_model)[t])
                           for j in range(K)) for t in range(16)])
    torch.testing.assert_close(y.view(-1, CFG.d_model), ref)
    assert moe.load.sum().item() == pytest.approx(1.0)
    # balance loss: alpha * E * sum f_i P_i, equal to alpha exactly when load and probabilities are uniform
    assert moe.aux_loss.item() == pytest.approx(1e-2 * E * (moe.load * probs.mean(0)).sum().item())
    # capacity: with factor 0.5 each expert serves at most ceil(0.5 * K * 16 / E) = 4 pairs; dropped pairs add 0
    moe.capacity_factor = 0.5
    y_cap = moe(x)
    assert not torch.allclose(y_cap, y)
    served = (y_cap.view(-1, CFG.d_model).abs().sum(-1) > 0).sum().item()
    assert served <= 4 * E


def _train(rank, world, capacity_factor, ep):
    """ep ranks (= dp ranks here), each with its own slice of the global batch; one process: world == 1 runs
    the same per-rank batches one after another (capacity is per rank's batch, so that is the reference)."""
    torch.manual_seed(0)
    model = add_moe(Transformer(CFG), E, K, capacity_factor).double()
    if ep > 1:
        for m in moe_layers(model):
            shard_experts(m, rank, ep, None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses, loads = [], []
    for step in range(STEPS):
        tokens = torch.randint(0, CFG.vocab_size, (4 * PER_RANK, 17), generator=gen)
        slices = [tokens[r * PER_RANK:(r + 1) * PER_RANK] for r in range(4)]
        mine = slices[rank * 4 // ep:(rank + 1) * 4 // ep]
        total = 0.0
        for s in mine:  # each group of PER_RANK sequences is one "rank batch"
            _, loss = model(s[:, :-1], s[:, 1:])
            loss = (loss + aux_loss(model)) / 4
            loss.backward()
            total += loss.detach()
        if ep > 1:
            dense = [p for n, p in model.named_parameters() if ".experts." not in n]
            for p in dense:
                dist.all_reduce(p.grad)
            dist.all_reduce(total)
            reduce_expert_grads(model, dp=1)  # losses were already divided by the global count
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # (clipping over shards is zero.py's business)
        opt.step()
        opt.zero_grad()
        losses.append(total.item())
    experts = {(i, m.first_expert + j): [p.detach().clone() for p in e.parameters()]
               for i, m in enumerate(moe_layers(model)) for j, e in enumerate(m.experts)}
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." not in n}
    return losses, experts, dense


@pytest.mark.parametrize("ep", [2, 4])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_expert_parallel_equals_one_process(ep, capacity_factor):
    ref_losses, ref_experts, ref_dense = _train(0, 1, capacity_factor, 1)
    results = run_distributed(_train, ep, capacity_factor, ep)
    # float64, same arithmetic up to the order of the all-reduce's sum: 1e-10 relative is ample.
    for losses, experts, dense in results:
        assert losses == pytest.approx(ref_losses, rel=1e-10)
        for n, p in dense.items():
            torch.testing.assert_close(p, ref_dense[n], rtol=1e-9, atol=1e-12)
    merged = {key: val for _, experts, _ in results for key, val in experts.items()}
    assert merged.keys() == ref_experts.keys()
    for key, params in ref_experts.items():
        for a, b in zip(params, merged[key]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------ through pretrain.py
import json
import os

import pretrain

FAST = ["--model", "tiny", "--seq-len", "16", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
        "--eval-iters", "1", "--sample-tokens", "0", "--log-every", "1", "--max-steps", "3",
        "--experts", "4", "--topk", "2", "--capacity-factor", "1.0", "--moe-layers", "1,3"]


def _pretrain_moe(rank, world, out, cache, extra):
    os.environ["LLM_DATA_CACHE"] = cache
    return pretrain.main(FAST + extra + ["--out", f"{out}/{'-'.join(extra)}"])["losses"]


def test_pretrain_moe_logs_balance_and_composes_with_tp_and_zero1(tmp_path, stdlib_data, data_cache):
    """One process logs the balancing loss and expert load; tp 2 (experts split column/row-wise, router
    replicated) and ZeRO-1 over 2 data-parallel ranks (experts replicated) give one process's losses (fp32,
    another summation order: float32 rounding, amplified a little over 3 steps)."""
    one = pretrain.main(FAST + ["--out", str(tmp_path / "one")])
    rec = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert rec[-1]["aux_loss"] > 0 and 0 <= rec[-1]["expert_load_min"] <= 0.25 <= rec[-1]["expert_load_max"]
    # Capacity is per rank's batch (moe.py): with 2 data-parallel ranks the reference cuts the batch the same way.
    accum2 = pretrain.main(FAST + ["--grad-accum", "2", "--out", str(tmp_path / "accum2")])
    for extra, ref in ((["--tp", "2"], one), (["--zero", "1"], accum2)):
        for losses in run_distributed(_pretrain_moe, 2, str(tmp_path), str(data_cache), extra):
            assert losses == pytest.approx(ref["losses"], rel=1e-4), extra
