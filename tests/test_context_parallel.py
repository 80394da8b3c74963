"""context_parallel.py: ring attention over cp gloo processes equals attention over the whole sequence.

float64 on CPU: the ring computes the same sums in another order (blocks merged by their logsumexp), so outputs
and gradients agree to float64 rounding, ~1e-15 relative; 1e-12 leaves room for the merges' exp and log.
"""
import math

import pytest
import torch

import flash_attn
from context_parallel import (ring_attention, ring_schedule, schedule_work, zigzag_chunks, zigzag_positions,
                              zigzag_split)
from distributed import run_distributed


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


@pytest.mark.parametrize("cp, T", [(2, 20), (4, 40)])  # chunks of 5 tokens: ragged against 4-row tiles
def test_ring_attention_equals_full_attention(cp, T):
    results = run_distributed(_ring_worker, cp, T)
    q, k, v, do = inputs(T=T, **SHAPE)
    for causal in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = full_attention(*leaves, causal)
        o.backward(do)
        for i, (name, want) in enumerate(zip(("out", "dq", "dk", "dv"), [o] + [x.grad for x in leaves])):
            got = torch.empty_like(want)
            for r in range(cp):  # each rank's rows back to their global positions
                got[:, :, zigzag_positions(T, cp, r)] = results[r][causal][i]
            torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"cp {cp} causal {causal} {name}: {m}")


def test_ring_of_one_rank_is_flash_attention():
    q, k, v, do = inputs(T=12, **SHAPE)
    torch.testing.assert_close(ring_attention(q, k, v), full_attention(q, k, v, True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_zigzag_gives_every_rank_equal_causal_work(cp):
    T = 2 * cp * 3
    c = T // (2 * cp)
    work = [schedule_work(ring_schedule(cp, r, True), c, True) for r in range(cp)]
    # The blocks cover the causal triangle exactly once, and every rank computes the same share of it.
    assert sum(work) == T * (T + 1) // 2 and len(set(work)) == 1
    # Fully masked pairs are skipped: 2 diagonal and 2cp - 1 full blocks of the 4cp a rank could compute.
    for r in range(cp):
        offsets = [off for step in ring_schedule(cp, r, True) for _, _, off in step]
        assert len(offsets) == 2 * cp + 1 and offsets.count(0) == 2 and min(offsets) >= 0
    non_causal = [schedule_work(ring_schedule(cp, r, False), c, False) for r in range(cp)]
    assert non_causal == [T * T // cp] * cp
    # Contiguous chunks (rank r holding tokens [r T/cp, (r+1) T/cp)) would give rank r one diagonal and r full
    # blocks: rank cp-1 would do 2cp-1 times the work of rank 0. The zigzag pairs a late chunk with an early one.
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
    """NCCL's send completes only when the peer posts the matching receive, so two ring neighbours that both sent
    first would deadlock on GPUs (gloo buffers sends and hides it). Every call here posts one send to the next rank
    together with one receive from the previous, and every rank posts the same sequence of calls."""
    cp = 4
    per_rank = run_distributed(_recorded_exchanges, cp)
    for rank, calls in enumerate(per_rank):
        # forward: cp-1 K/V hops; backward: cp-1 K/V hops and cp dK/dV hops
        assert len(calls) == 3 * (cp - 1) + 1
        for ops in calls:
            assert [(op, peer) for op, peer, _ in ops] == [("isend", (rank + 1) % cp), ("irecv", (rank - 1) % cp)]
            assert ops[0][2] == ops[1][2]
        assert [[shape for *_, shape in ops] for ops in calls] == [[s for *_, s in ops] for ops in per_rank[0]]
