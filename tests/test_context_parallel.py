"""context_parallel.py: ring attention over cp gloo processes equals attention over the whole
sequence, and training with --cp equals one process.

float64 on CPU: the ring computes the same sums in another order (blocks merged by their logsumexp),
so outputs and gradients agree to float64 rounding, ~1e-15 relative; 1e-12 leaves room for the
merges' exp and log.
"""
import contextlib
import math
import re
from dataclasses import replace

import pytest
import torch

import flash_attn
import flags
import pretrain
import stack
import tensor_parallel
import training
from context_parallel import (ring_attention, ring_schedule, schedule_work, zigzag_chunks,
                              zigzag_positions, zigzag_split)
from model import PRESETS
from tests.distributed import refused_before_any_group, run_distributed
from topology import Topology


def full_attention(q, k, v, causal):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(s, -1) @ v


def inputs(B, H, H_kv, T, D):
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, H_kv, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, do


SHAPE = dict(B=2, H=4, H_kv=2, D=16)  # GQA: two query heads per KV head


def _ring_worker(rank, world, T):
    flash_attn.TWIN_BLOCK = 4  # several tiles per chunk: the offsets cross tile edges
    q, k, v, do = inputs(T=T, **SHAPE)
    out = {}
    for causal in (True, False):
        local = [zigzag_split(x, world, rank, dim=2).requires_grad_() for x in (q, k, v)]
        o = ring_attention(*local, causal=causal)
        o.backward(zigzag_split(do, world, rank, dim=2))
        out[causal] = [o.detach()] + [x.grad for x in local]
    return out


# Chunks of 5 tokens: ragged against 4-row tiles.
@pytest.mark.parametrize("cp, T", [(2, 20), (4, 40)])
def test_ring_attention_equals_full_attention(cp, T):
    results = run_distributed(_ring_worker, cp, T)
    q, k, v, do = inputs(T=T, **SHAPE)
    for causal in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = full_attention(*leaves, causal)
        o.backward(do)
        for i, (name, want) in enumerate(zip(("out", "dq", "dk", "dv"),
                                             [o] + [x.grad for x in leaves])):
            got = torch.empty_like(want)
            for r in range(cp):  # each rank's rows back to their global positions
                got[:, :, zigzag_positions(T, cp, r)] = results[r][causal][i]
            torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"cp {cp} causal {causal} {name}: {m}")


def test_ring_of_one_rank_is_flash_attention():
    q, k, v, do = inputs(T=12, **SHAPE)
    torch.testing.assert_close(ring_attention(q, k, v), full_attention(q, k, v, True),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_zigzag_gives_every_rank_equal_causal_work(cp):
    T = 2 * cp * 3
    c = T // (2 * cp)
    work = [schedule_work(ring_schedule(cp, r, True), c, True) for r in range(cp)]
    # The blocks cover the causal triangle exactly once, and every rank computes an equal share.
    assert sum(work) == T * (T + 1) // 2 and len(set(work)) == 1
    # Fully masked pairs are skipped: 2 diagonal and 2cp - 1 full blocks, of the 4cp possible.
    for r in range(cp):
        offsets = [off for step in ring_schedule(cp, r, True) for _, _, off in step]
        assert len(offsets) == 2 * cp + 1 and offsets.count(0) == 2 and min(offsets) >= 0
    non_causal = [schedule_work(ring_schedule(cp, r, False), c, False) for r in range(cp)]
    assert non_causal == [T * T // cp] * cp
    # Contiguous chunks (rank r holding tokens [r T/cp, (r+1) T/cp)) would give rank r one diagonal
    # and r full blocks: rank cp-1 would do 2cp-1 times the work of rank 0. The zigzag pairs a late
    # chunk with an early one.
    assert sorted(a for r in range(cp) for a in zigzag_chunks(cp, r)) == list(range(2 * cp))


def test_zigzag_positions_cover_the_sequence_once():
    T, cp = 24, 3
    pos = torch.cat([zigzag_positions(T, cp, r) for r in range(cp)])
    assert sorted(pos.tolist()) == list(range(T))
    assert zigzag_positions(T, cp, 1).tolist() == [4, 5, 6, 7, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="sequence length 20 must be a multiple of 2 x cp = 6"):
        zigzag_positions(20, 3, 0)


def _recorded_exchanges(rank, world):
    """Every batch_isend_irecv call of one forward and backward, as (op, peer, shape) lists."""
    import torch.distributed as dist
    calls, real = [], dist.batch_isend_irecv

    def record(ops):
        calls.append([(op.op.__name__, op.peer, tuple(op.tensor.shape)) for op in ops])
        return real(ops)
    dist.batch_isend_irecv = record
    q, k, v, do = inputs(T=16, **SHAPE)
    local = [zigzag_split(x, world, rank, dim=2).requires_grad_() for x in (q, k, v)]
    ring_attention(*local).backward(zigzag_split(do, world, rank, dim=2))
    return calls


def test_every_send_is_posted_with_the_receive_it_crosses():
    """NCCL's send completes only when the peer posts the matching receive, so two ring neighbours
    that both sent first would deadlock on GPUs (gloo buffers sends and hides it). Every call here
    posts one send to the next rank together with one receive from the previous, and every rank
    posts the same sequence of calls."""
    cp = 4
    per_rank = run_distributed(_recorded_exchanges, cp)
    for rank, calls in enumerate(per_rank):
        # forward: cp-1 K/V hops; backward: cp-1 K/V hops and cp dK/dV hops
        assert len(calls) == 3 * (cp - 1) + 1
        for ops in calls:
            assert [(op, peer) for op, peer, _ in ops] == [("isend", (rank + 1) % cp),
                                                           ("irecv", (rank - 1) % cp)]
            assert ops[0][2] == ops[1][2]
        assert [[shape for *_, shape in ops] for ops in calls] == [[s for *_, s in ops]
                                                                   for ops in per_rank[0]]


# ------------------------------------------------------------------ composed with the training loop
# Head dim 16 (flash_attn.py's smallest), GQA, T = 16: chunks of 4 tokens at cp 2.
CFG = replace(PRESETS["tiny"], n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, vocab_size=64,
              block_size=16, attn="flash")
STEPS, N_MICRO, ROWS, CLIP = 3, 2, 4, 0.05  # 2 micro-batches of 4 rows per step; clipping active


def micro_batches(step):
    g = torch.Generator().manual_seed(step)
    seq = torch.randint(0, CFG.vocab_size, (N_MICRO * ROWS, CFG.block_size + 1), generator=g)
    # ignored labels, inside one cp rank's chunks: the token count must be global
    seq[0, 3:7] = -100
    x, y = seq[:, :-1].clamp(min=0), seq[:, 1:]
    return list(zip(x.chunk(N_MICRO), y.chunk(N_MICRO)))


def train(topo, zero=0):
    """stack.py's and training.py's pieces in float64: build_model (ring attention under cp),
    build_training over dp x cp, forward_backward on each dp rank's share of the rows (every cp rank
    of a replica takes the same rows); the losses of the steps, then a held-out loss (evaluate)."""
    flash_attn.TWIN_BLOCK = 4  # several tiles per chunk
    model = stack.build_model(CFG, topo, seed=0, device=torch.device("cpu"), dtype=torch.float64)
    cfg = pretrain.parse(["--zero", str(zero), "--lr", "1e-2", "--bucket-mb", "0.01", "--attn",
                          "flash", "--cp", str(topo.cp)])
    module, opt = stack.build_training(model, cfg, torch.float64, topo)
    losses, norms = [], []
    for step in range(STEPS):
        mine = micro_batches(step)
        mine = [(x.chunk(topo.dp)[topo.dp_rank], y.chunk(topo.dp)[topo.dp_rank]) for x, y in mine]
        loss = training.forward_backward(module, mine, topo, "1f1b", opt.scale_loss, "cpu",
                                         opt.no_sync)
        norm, _ = opt.step(CLIP)
        opt.zero_grad()
        losses.append(training.mean_over_dp(loss, topo).item())
        norms.append(norm)
    held_out = [(x.chunk(topo.dp)[topo.dp_rank], y.chunk(topo.dp)[topo.dp_rank])
                for x, y in micro_batches(99)]
    losses.append(training.evaluate(module, held_out, "cpu", topo, 1))
    with opt.gathered() if zero == 3 else contextlib.nullcontext():
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, norms, params


def _train_layouts(rank, world, layouts):
    out = []
    for tp, cp, zero in layouts:
        topo = Topology(tp=tp, cp=cp)
        out.append((topo.tp_rank, train(topo, zero)))
    return out


@pytest.mark.parametrize("world, layouts", [(2, [(1, 2, 0)]),
                                            (8, [(2, 2, 3), (2, 2, 1), (1, 4, 2)])],
                         ids=["cp2", "zero3-cp2-tp2,zero1-cp2-tp2,zero2-cp4"])
def test_context_parallel_training_matches_one_process(world, layouts):
    """cp 2 alone; then on 8 ranks dp 2 x cp 2 x tp 2 with ZeRO-3 and ZeRO-1 (shards over dp x cp,
    tp slices inside), and dp 2 x cp 4 with ZeRO-2."""
    ref_losses, ref_norms, ref_params = train(Topology())
    assert min(ref_norms) > CLIP
    for per_layout in run_distributed(_train_layouts, world, layouts):
        for (tp, cp, zero), (tp_rank, (losses, norms, params)) in zip(layouts, per_layout):
            # float64, the same sums in another order (ring blocks merged by logsumexp, gradients
            # all-reduced): agreement near 1e-14 after 3 AdamW steps; 1e-10 leaves room.
            assert losses == pytest.approx(ref_losses, rel=1e-10)
            assert norms == pytest.approx(ref_norms, rel=1e-10)
            for name, p in params.items():
                d = tensor_parallel.split_dim(name)
                want = (ref_params[name] if d is None or tp == 1
                        else ref_params[name].chunk(tp, dim=d)[tp_rank])
                torch.testing.assert_close(p, want, rtol=1e-10, atol=1e-12,
                                           msg=f"{tp, cp, zero} {name}")


FAST = ["--seq-len", "32", "--batch-size", "4", "--max-steps", "4", "--warmup-steps", "1",
        "--eval-iters", "1", "--eval-every", "4", "--sample-tokens", "0", "--log-every", "1",
        "--cp", "2"]  # (flash)


def _resume(rank, world, out):
    whole = pretrain.main(FAST + ["--out", f"{out}/whole"])
    pretrain.main(FAST + ["--out", f"{out}/split", "--stop-after", "2"])
    second = pretrain.main(FAST + ["--out", f"{out}/split", "--resume"])
    same = all(torch.equal(a, b) for a, b in zip(whole["model"].parameters(),
                                                 second["model"].parameters()))
    return whole["losses"], second["losses"], same


def test_context_parallel_resume_is_exact(tmp_path, stdlib_data):
    (whole, second, same), _ = run_distributed(_resume, 2, str(tmp_path))
    # fp32, bit for bit: the data position and RNG travel in the checkpoint
    assert second == whole[2:] and same


@pytest.mark.parametrize("world, flags, match", [
    (3, ["--cp", "2"], "world size 3 is not divisible by --tp 1 x --pp 1 x --cp 2 = 2"),
    (4, ["--cp", "2", "--pp", "2", "--attn", "flash"],
     "--cp 2 with --pp: the pipeline sends whole sequences"),
    (4, ["--cp", "2", "--tp", "2", "--sequence-parallel", "--attn", "flash"],
     "--cp 2 with --sequence-parallel"),
    (4, ["--cp", "2", "--experts", "4", "--ep", "2", "--attn", "flash"], "--cp 2 with experts"),
    (2, ["--cp", "2", "--experts", "4", "--attn", "flash"],
     "--cp 2 with experts.*use a dense model"),
    (2, ["--cp", "2", "--attn", "sdpa"],
     "--cp 2 runs ring attention.*drop --attn sdpa \\(--cp picks flash\\)"),
    (2, ["--cp", "2", "--attn", "naive"], "--cp 2 runs ring attention.*drop --attn naive"),
    (6, ["--cp", "3", "--seq-len", "32", "--attn", "flash"],
     "cuts each sequence into 2 x 3 equal chunks.*divisible by 6 \\(got 32\\)"),
])
def test_bad_context_parallel_layouts_are_refused(tmp_path, capsys, monkeypatch, world, flags,
                                                  match):
    assert re.search(match, refused_before_any_group(tmp_path, capsys, monkeypatch, world, flags))


@pytest.mark.parametrize("argv, attn", [(["--cp", "2"], "flash"), ([], "sdpa"),
                                        (["--attn", "naive"], "naive"),
                                        (["--cp", "2", "--attn", "flash"], "flash")])
def test_cp_picks_the_attention_it_needs(tmp_path, argv, attn):
    """Without --attn, --cp > 1 takes flash_attn.py's blocks (ring attention's), and no --cp sdpa;
    a given --attn is kept (a contradicting one is refused above)."""
    cfg = pretrain.parse(argv + ["--out", str(tmp_path / "run")])
    flags.check_args(cfg, 2)
    assert flags.resolved(cfg).settings.attn == attn


def _sft(rank, world, argv):
    import sft
    res = sft.main(argv)
    return res["losses"], res["val_losses"]


def test_sft_with_context_parallel_matches_one_process(tmp_path):
    """sft.py shares the loop: its masked loss under --cp 2 (rows padded to a multiple of 4, each
    rank holding half of every example's tokens) equals one process's, to fp32 rounding."""
    import sft
    from sft_fixtures import CFG as SFT_CFG, make_init, reverse_examples, write_jsonl
    # head dim 16, flash_attn.py's smallest
    init = make_init(tmp_path / "init", replace(SFT_CFG, d_model=64))
    argv = ["--init", str(init),
            "--data", str(write_jsonl(tmp_path / "train.jsonl", reverse_examples(24))),
            "--val-data", str(write_jsonl(tmp_path / "val.jsonl", reverse_examples(6, seed=1))),
            "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1", "--max-steps", "3",
            "--eval-every", "3", "--samples", "0", "--log-every", "1", "--attn", "flash"]
    one = sft.main(argv + ["--out", str(tmp_path / "one")])
    for losses, val_losses in run_distributed(_sft, 2,
                                              argv + ["--out", str(tmp_path / "cp"), "--cp", "2"]):
        assert losses == pytest.approx(one["losses"], rel=1e-5)
        assert val_losses == pytest.approx(one["val_losses"], rel=1e-5)


def test_sft_refuses_packing_with_context_parallel(tmp_path, capsys, monkeypatch):
    import sft
    from sft_fixtures import CFG as SFT_CFG, make_init, reverse_examples, write_jsonl
    init = make_init(tmp_path / "init", replace(SFT_CFG, d_model=64))
    data = str(write_jsonl(tmp_path / "train.jsonl", reverse_examples(8)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        sft.main(["--init", str(init), "--data", data, "--val-data", data,
                  "--out", str(tmp_path / "out"), "--batch-size", "2", "--cp", "2", "--pack",
                  "--attn", "flash"])
    assert e.value.code == 2 and not torch.distributed.is_initialized()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and ("--cp 2 with --pack: document masks across a ring are "
                                "not implemented") in err


def test_without_cp_any_sequence_length_is_accepted():
    """The 2cp-chunks rule applies under --cp only: an odd --seq-len trains without it."""
    tiny = PRESETS["tiny"]
    flags.check_model_layout(tiny, pretrain.parse(["--seq-len", "31"]), "model 'tiny'")  # no error
    with pytest.raises(flags.TopologyError, match="divisible by 4 \\(got 31\\)"):
        cp = pretrain.parse(["--seq-len", "31", "--cp", "2", "--attn", "flash"])
        flags.check_model_layout(tiny, cp, "model 'tiny'")
