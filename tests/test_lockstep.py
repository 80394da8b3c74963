"""Decisions ranks in lockstep must make alike, whatever the last bits of their arithmetic.

Generation under tp, ZeRO-3 or ep: every forward is a collective over the ranks, and their logits
may differ in the last bits (reductions in another order). Here rank 1's logits are made to differ
on purpose, enough to flip its choice; each forward passes a barrier with a timeout (a rank that
left the loop early fails it instead of hanging the test). With rank 0's token broadcast
(topology.rank0_token) both ranks produce the same text.

MoE's combine: tensor-parallel ranks hold the same activations and must route them alike; adding the
experts' outputs with atomics (index_add_ on CUDA) would sum in a varying order. moe.combine sums in
a fixed one; a CPU cannot show atomics' nondeterminism, so the tests check that it is the sum it
replaces, exactly."""
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist

import data
import moe
import sft
from model import PRESETS, Transformer
from tests.distributed import run_distributed
from topology import rank0_token

CFG = replace(PRESETS["tiny"], n_layer=1, d_model=32, n_head=2, n_kv_head=2, d_ff=64,
              vocab_size=320, block_size=48)


class RankNoisyModel(Transformer):
    """A model whose forward passes a barrier (the collective of a lockstep forward) and whose
    logits, on rank 1 only, favour `token` at the `flip_at`-th forward."""

    def __init__(self, token, flip_at):
        torch.manual_seed(0)
        super().__init__(CFG)
        self.token, self.flip_at, self.calls = token, flip_at, 0

    def forward(self, idx, *args, **kwargs):
        dist.monitored_barrier(timeout=timedelta(seconds=30))
        logits, loss = super().forward(idx, *args, **kwargs)
        self.calls += 1
        if dist.get_rank() == 1 and self.calls == self.flip_at:
            logits = logits.clone()
            logits[..., -1, self.token] = logits[..., -1, :].max() + 100.0
        return logits, loss


def _greedy_answers(rank, world):
    enc = data.get_tokenizer("bytes")
    # rank 1 alone would stop at the 3rd token
    model = RankNoisyModel(sft.eot_id(enc), flip_at=3).eval()
    with torch.no_grad():
        return sft.answer(model, enc, list(b"def f():"), 12, "cpu", rank0_token(True))


def test_greedy_answers_stop_together_and_agree():
    a, b = run_distributed(_greedy_answers, 2)
    assert a == b and len(a.encode("utf-8", "surrogateescape")) > 3, (a, b)


def _samples(rank, world):
    torch.manual_seed(1)  # every rank draws with the same seed, as pretrain.sample does
    model = RankNoisyModel(token=ord("Z"), flip_at=2).eval()
    prompt = torch.tensor([list(b"def ")])
    return model.generate(prompt, 6, temperature=0.8, top_k=50, n_vocab=257,
                          agree=rank0_token(True))


def test_sampled_tokens_agree_over_ranks():
    a, b = run_distributed(_samples, 2)
    assert torch.equal(a, b) and a.shape[1] == 10, (a, b)
    assert a[0, 5] != ord("Z")  # rank 0's draw, not rank 1's forced one


def test_moe_combine_is_the_index_add_it_replaces():
    torch.manual_seed(0)
    for k, N in ((1, 7), (2, 9), (4, 5)):
        # some pairs dropped (capacity), the rest in expert order
        pairs = torch.randperm(k * N)[:k * N - 3]
        y = torch.randn(len(pairs), 6, dtype=torch.float64)
        old = torch.zeros(N, 6, dtype=torch.float64).index_add_(0, pairs % N, y)
        new = moe.combine(y, pairs, k, N)
        if k <= 2:  # (0 + a) + b == a + b: the same sum, bit for bit
            assert torch.equal(new, old)
        torch.testing.assert_close(new, old, rtol=0, atol=1e-14)


def test_moe_layer_is_bitwise_reproducible_with_its_gradients():
    layer = moe.MoE(CFG, n_experts=4, top_k=2, capacity_factor=1.0)
    x = torch.randn(3, 10, CFG.d_model, requires_grad=True)
    runs = []
    for _ in range(2):
        out = layer(x)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        runs.append((out.detach().clone(), x.grad.clone(),
                     [p.grad.clone() for p in layer.parameters() if p.grad is not None]))
        x.grad = None
        layer.zero_grad()
    (o1, gx1, g1), (o2, gx2, g2) = runs
    assert (torch.equal(o1, o2) and torch.equal(gx1, gx2)
            and all(torch.equal(a, b) for a, b in zip(g1, g2)))
