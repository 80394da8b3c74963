"""MoE: routing rules, and expert parallelism over all-to-all against one process."""
import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import pretrain
from model import PRESETS, Transformer
from amp import clip_coef, global_grad_norm
from moe import (MoE, MoEError, add_moe, aux_loss, check_moe, expert_params, load_spread,
                 moe_layers, reduce_expert_grads, shard_experts)
from tests.distributed import refused_before_any_group, run_distributed

CFG = replace(PRESETS["tiny"], n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=48, vocab_size=64,
              block_size=16)
E, K, STEPS, PER_RANK = 4, 2, 3, 2
EP_CLIP = 0.1  # below every step's gradient norm in _train (asserted): the clipping is active


def _all_reduce(x):
    dist.all_reduce(x)
    return x


def test_bad_settings_are_refused():
    with pytest.raises(MoEError, match="--experts 6 is not divisible by --ep 4"):
        check_moe(6, 2, None, ep=4)
    with pytest.raises(MoEError, match="--topk 5 must be between 1 and --experts 4"):
        check_moe(4, 5, None)
    with pytest.raises(MoEError, match="--capacity-factor must be > 0"):
        check_moe(4, 2, 0.0)


def test_routing_gates_and_dropless_output():
    torch.manual_seed(0)
    moe = MoE(CFG, n_experts=E, top_k=K, capacity_factor=None).double()
    x = torch.randn(2, 8, CFG.d_model, dtype=torch.float64)
    y = moe(x)
    # dropless: the output is the gate-weighted sum of each token's top-k experts, computed by hand
    xs = x.view(-1, CFG.d_model)
    probs = torch.softmax(xs @ moe.router.weight.t(), -1)
    top_p, top_e = probs.topk(K, -1)
    ref = torch.stack([sum(top_p[t, j] / top_p[t].sum() * moe.experts[top_e[t, j]](xs[t])
                           for j in range(K))
                       for t in range(16)])
    torch.testing.assert_close(y.view(-1, CFG.d_model), ref)


def test_balance_loss_and_load_recomputed_from_the_routing():
    """f_i (share of (token, choice) pairs that chose expert i) counted by hand, P_i the mean router
    probability: the module's load, its loss alpha * E * sum f_i P_i and that loss's gradient
    (through P only) must match."""
    torch.manual_seed(0)
    moe = MoE(CFG, n_experts=E, top_k=K, capacity_factor=None, aux_loss_weight=0.03).double()
    xs = torch.randn(16, CFG.d_model, dtype=torch.float64)
    moe(xs)
    probs = torch.softmax(xs @ moe.router.weight.t(), -1)
    chosen = probs.topk(K, -1).indices.reshape(-1).tolist()
    f = torch.tensor([chosen.count(i) / (16 * K) for i in range(E)], dtype=torch.float64)
    P = probs.mean(0)
    assert f.max() > f.min()  # an uneven routing, so a wrong count cannot pass by symmetry
    torch.testing.assert_close(moe.load, f, rtol=0, atol=0)
    ref = 0.03 * E * (f * P).sum()
    torch.testing.assert_close(moe.aux_loss, ref)
    grad, = torch.autograd.grad(moe.aux_loss, moe.router.weight)
    ref_grad, = torch.autograd.grad(ref, moe.router.weight)
    torch.testing.assert_close(grad, ref_grad)


def test_load_spread_is_the_busiest_and_idlest_share_averaged_over_layers():
    """Routers set by hand to score token features +-1 as [3, 2, -2, -3]: a +1 token picks experts 0
    and 1, a -1 token experts 3 and 2. Layer 0 sees only +1 tokens (load 1/2, 1/2, 0, 0), layer 1
    alternating ones (1/4 each)."""
    model = add_moe(Transformer(CFG), E, K)
    layers = moe_layers(model)
    sign = torch.tensor([1.0, -1.0] * 4)
    for layer, feature in zip(layers, (sign.abs(), sign)):
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[:, 0] = torch.tensor([3.0, 2.0, -2.0, -3.0])
        layer.route(F.pad(feature[:, None], (0, CFG.d_model - 1)))
    torch.testing.assert_close(layers[0].load, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(layers[1].load, torch.tensor([0.25, 0.25, 0.25, 0.25]))
    assert load_spread(model) == pytest.approx(((0.5 + 0.25) / 2, (0.0 + 0.25) / 2))


def test_capacity_serves_first_choices_first_and_at_most_c_pairs_per_expert():
    """capacity_factor 0.5: C = ceil(0.5 * K * 16 / E) = 4 pairs per expert. The served pairs are
    chosen by hand (every token's first choice, in token order, before any second choice) and the
    output rebuilt from them."""
    torch.manual_seed(0)
    moe = MoE(CFG, n_experts=E, top_k=K, capacity_factor=0.5).double()
    xs = torch.randn(16, CFG.d_model, dtype=torch.float64)
    probs = torch.softmax(xs @ moe.router.weight.t(), -1)
    top_p, top_e = probs.topk(K, -1)
    gates = top_p / top_p.sum(-1, keepdim=True)

    def served(pairs, C=4):
        taken, out = [0] * E, []
        for t, j in pairs:
            if taken[top_e[t, j]] < C:
                taken[top_e[t, j]] += 1
                out.append((t, j))
        return out

    choice_major = served([(t, j) for j in range(K) for t in range(16)])
    token_major = served([(t, j) for t in range(16) for j in range(K)])
    # the order matters here
    assert len(choice_major) < 16 * K and set(choice_major) != set(token_major)
    ref = torch.zeros_like(xs)
    for t, j in choice_major:
        ref[t] += gates[t, j] * moe.experts[top_e[t, j]](xs[t])
    torch.testing.assert_close(moe(xs), ref)


def _train(rank, world, capacity_factor, ep):
    """ep ranks (= dp ranks here), each with its own slice of the global batch; one process (world
    == 1) runs the same per-rank batches one after another: capacity is per rank's batch, so that is
    the reference."""
    torch.manual_seed(0)
    model = add_moe(Transformer(CFG), E, K, capacity_factor).double()
    if ep > 1:
        for m in moe_layers(model):
            shard_experts(m, rank, ep, None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses, norms = [], []
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
        # each rank's experts are its own: their part of the squared norm is summed over ep ranks
        if ep > 1:
            dense = [p.grad for n, p in model.named_parameters() if ".experts." not in n]
            norm = global_grad_norm(dense, None, [p.grad for p in expert_params(model)],
                                    _all_reduce)
            for p in model.parameters():
                p.grad.mul_(clip_coef(norm, EP_CLIP))
        else:  # the reference: torch's own clipping over the whole model
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), EP_CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(total.item())
        norms.append(norm.item())
    experts = {(i, m.first_expert + j): [p.detach().clone() for p in e.parameters()]
               for i, m in enumerate(moe_layers(model)) for j, e in enumerate(m.experts)}
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." not in n}
    return losses, norms, experts, dense


@pytest.mark.parametrize("ep", [2, 4])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_expert_parallel_equals_one_process(ep, capacity_factor):
    ref_losses, ref_norms, ref_experts, ref_dense = _train(0, 1, capacity_factor, 1)
    assert min(ref_norms) > EP_CLIP
    results = run_distributed(_train, ep, capacity_factor, ep)
    # float64, same arithmetic up to the order of the all-reduce's sum: 1e-10 relative is ample.
    for losses, norms, experts, dense in results:
        assert losses == pytest.approx(ref_losses, rel=1e-10)
        assert norms == pytest.approx(ref_norms, rel=1e-10)
        for n, p in dense.items():
            torch.testing.assert_close(p, ref_dense[n], rtol=1e-9, atol=1e-12)
    merged = {key: val for _, _, experts, _ in results for key, val in experts.items()}
    assert merged.keys() == ref_experts.keys()
    for key, params in ref_experts.items():
        for a, b in zip(params, merged[key]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _host_syncs(rank, world):
    """tolist / item calls (each waits for the device) in one MoE forward and backward at ep=2."""
    torch.manual_seed(0)
    model = add_moe(Transformer(CFG), E, K, capacity_factor=1.0)
    for m in moe_layers(model):
        shard_experts(m, rank, world, None)
    x = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank))
    calls = []
    real = torch.Tensor.tolist, torch.Tensor.item
    torch.Tensor.tolist = lambda t: calls.append("tolist") or real[0](t)
    torch.Tensor.item = lambda t: calls.append("item") or real[1](t)
    try:
        _, loss = model(x[:, :-1], x[:, 1:])
        (loss + aux_loss(model)).backward()
    finally:
        torch.Tensor.tolist, torch.Tensor.item = real
    return len(moe_layers(model)), calls


def test_expert_parallel_syncs_the_host_once_per_layer():
    """all_to_all_single takes host ints as splits: one .tolist() per MoE layer, none backward."""
    for layers, calls in run_distributed(_host_syncs, 2):
        assert calls == ["tolist"] * layers


# ------------------------------------------------------------------------------ through pretrain.py
FAST = ["--model", "tiny", "--seq-len", "16", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps",
        "2", "--eval-iters", "1", "--sample-tokens", "0", "--log-every", "1", "--max-steps", "3",
        "--experts", "4", "--topk", "2", "--capacity-factor", "1.0", "--moe-layers", "1,3"]


def _pretrain_moe(rank, world, out, cache, extra):
    os.environ["LLM_DATA_CACHE"] = cache
    return pretrain.main(FAST + extra + ["--out", f"{out}/{'-'.join(extra)}"])["losses"]


def test_pretrain_moe_logs_balance_and_composes_with_tp_and_zero1(tmp_path, stdlib_data,
                                                                   data_cache):
    """One process logs the balancing loss and expert load; tp 2 (experts split column/row-wise,
    router replicated) and ZeRO-1 over 2 data-parallel ranks (experts replicated) give one process's
    losses (fp32, another summation order: float32 rounding, amplified a little over 3 steps)."""
    one = pretrain.main(FAST + ["--out", str(tmp_path / "one")])
    rec = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
           if '"loss"' in l]
    # (the figures are checked against hand-made routings above; here: that they reach the log)
    assert (rec[-1]["aux_loss"] > 0
            and rec[-1]["expert_load_min"] < 0.25 < rec[-1]["expert_load_max"])
    # Capacity is per rank's batch (moe.py): with 2 data-parallel ranks the reference cuts the
    # batch the same way.
    grad_accum2 = pretrain.main(FAST + ["--grad-accum", "2", "--out",
                                        str(tmp_path / "grad_accum2")])
    for extra, ref in ((["--tp", "2"], one), (["--zero", "1"], grad_accum2)):
        for losses in run_distributed(_pretrain_moe, 2, str(tmp_path), str(data_cache), extra):
            assert losses == pytest.approx(ref["losses"], rel=1e-4), extra


# ----------------------------------------------------------- expert parallelism through pretrain.py
# a clip below every step's gradient norm (asserted): the clipping path is exercised
CLIP = ["--grad-clip", "0.05"]


def _weights(model):
    """Dense parameters by name, experts by (MoE layer, global expert index): alike on any ep."""
    experts = {(i, m.first_expert + j): [p.detach().clone() for p in e.parameters()]
               for i, m in enumerate(moe_layers(model)) for j, e in enumerate(m.experts)}
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." not in n}
    return experts, dense


def _norms(out):
    return [json.loads(l)["grad_norm"] for l in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in l]


def _pretrain_ep(rank, world, out, cache, runs, resume=None):
    os.environ["LLM_DATA_CACHE"] = cache
    results = []
    for extra in runs:
        run = pretrain.main(FAST + CLIP + extra + ["--out", f"{out}/{'-'.join(extra)}"])
        results.append((run["losses"], *_weights(run["model"])))
    # stopped after 2 steps and resumed: the same losses as uninterrupted; then step 2 again on ep 1
    if resume:
        first = pretrain.main(FAST + CLIP + resume + ["--stop-after", "2", "--out",
                                                      f"{out}/resume"])
        if rank == 0:  # a copy of the run as it was at step 2
            shutil.copytree(f"{out}/resume", f"{out}/resume-ep1")
        second = pretrain.main(FAST + CLIP + resume + ["--resume", "--out", f"{out}/resume"])
        dist.barrier()
        on_ep1 = pretrain.main(FAST + CLIP + ["--zero", "1", "--resume", "--out",
                                              f"{out}/resume-ep1"])
        results.append((first["losses"] + second["losses"], on_ep1["losses"]))
    return results


def _check_against(ref_dir, ref, results, out, runs, weights=True):
    """Losses, logged gradient norms and final weights of every rank against one process. fp32:
    another summation order, float32 rounding amplified a little by 3 Adam steps: rel 1e-4 on losses
    and norms; weights move by ~lr = 3e-3 a step, so 1e-5 absolute is a few thousandths of it."""
    ref_losses, ref_experts, ref_dense = ref["losses"], *_weights(ref["model"])
    ref_norms = _norms(ref_dir)
    assert min(ref_norms) > float(CLIP[1])  # clipping is active at every step
    for i, extra in enumerate(runs):
        assert _norms(out / "-".join(extra)) == pytest.approx(ref_norms, rel=1e-4), extra
        merged = {}
        for rank_results in results:
            losses, experts, dense = rank_results[i]
            assert losses == pytest.approx(ref_losses, rel=1e-4), extra
            # (tensor-parallel slices: their weights are checked in test_model_parallel.py)
            if not weights:
                continue
            for n, p in dense.items():
                torch.testing.assert_close(p, ref_dense[n], rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{extra} {n}: {m}")
            for key, params in experts.items():  # replicas (dp > ep) must agree with each other too
                merged.setdefault(key, params)
                for a, b in zip(params, merged[key]):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
        if not weights:
            continue
        assert merged.keys() == ref_experts.keys(), extra
        for key, params in ref_experts.items():
            for a, b in zip(params, merged[key]):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{extra} expert {key}: {m}")


def test_pretrain_expert_parallel_ep2_with_ddp_and_zero1_equals_one_process(
        tmp_path, stdlib_data, data_cache):
    """World 2, --ep 2 (dp 2): each rank holds 2 of the 4 experts of each MoE layer, capacity
    dropping on and the gradient clipped, with ddp.py and with ZeRO-1: the same losses, gradient
    norms and weights as one process running the same two per-rank batches as 2 accumulation
    micro-steps (capacity is per rank's batch). The ddp.py run also samples at the end (every rank
    in lockstep: each forward is an all-to-all)."""
    ref = pretrain.main(FAST + CLIP + ["--grad-accum", "2", "--out", str(tmp_path / "ref")])
    runs = [["--ep", "2", "--zero", "0", "--sample-tokens", "4"], ["--ep", "2", "--zero", "1"]]
    results = run_distributed(_pretrain_ep, 2, str(tmp_path), str(data_cache), runs,
                              ["--ep", "2", "--zero", "1"])
    _check_against(tmp_path / "ref", ref, [r[:2] for r in results], tmp_path, runs)
    # resumed equals uninterrupted exactly (each rank's own experts in its file)
    for rank_results in results:
        losses, on_ep1 = rank_results[2]
        assert losses == rank_results[1][0]
        # ep 2's checkpoint resumed on ep 1 (each rank all 4 experts): step 3 goes as on ep 2,
        # to fp32 rounding
        assert on_ep1 == pytest.approx(losses[2:], rel=1e-5)


def test_pretrain_expert_parallel_dp4_ep2_sums_expert_replicas_and_composes_with_tp(
        tmp_path, stdlib_data, data_cache):
    """World 4, dp 4, --ep 2: two replicas of each expert set; their gradients are summed over the
    expert-data group ({0,2} and {1,3}) and counted once in the norm. Against one process with 4
    accumulation micro-steps. And tp 2 x dp 2 with --ep 2 (experts split column/row-wise, then over
    ep): against 2 micro-steps."""
    refs = [pretrain.main(FAST + CLIP + ["--grad-accum", a, "--out",
                                         str(tmp_path / f"ref{a}")]) for a in "42"]
    runs = [["--ep", "2", "--zero", "1"], ["--tp", "2", "--ep", "2", "--zero", "0"]]
    results = run_distributed(_pretrain_ep, 4, str(tmp_path), str(data_cache), runs)
    _check_against(tmp_path / "ref4", refs[0], [r[:1] for r in results], tmp_path, runs[:1])
    _check_against(tmp_path / "ref2", refs[1], [r[1:] for r in results], tmp_path, runs[1:],
                   weights=False)


@pytest.mark.parametrize("world, flags, message", [
    (1, ["--experts", "4", "--ep", "2"], "--ep 2 does not divide the 1 data-parallel ranks"),
    (4, ["--experts", "4", "--ep", "2", "--tp", "4"],
     "--ep 2 does not divide the 1 data-parallel ranks"),
    (4, ["--experts", "6", "--ep", "4"], "--experts 6 is not divisible by --ep 4"),
    (2, ["--ep", "2"], "--ep 2 splits experts over ranks: give --experts"),
    (2, ["--experts", "4", "--ep", "2", "--zero", "2"],
     "--ep with --zero 2: ZeRO stages 2 and 3 shard"),
    (2, ["--experts", "4", "--ep", "2", "--zero", "3"], "use --zero 0 or 1"),
])
def test_expert_parallel_bad_input_fails_before_any_process_group(tmp_path, capsys, monkeypatch,
                                                                   world, flags, message):
    err = refused_before_any_group(tmp_path, capsys, monkeypatch, world, flags)
    assert message in err, err
