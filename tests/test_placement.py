"""placement.py: every parameter a rank builds says what it is in the whole model. On tp 2 x pp 2 x
ep 2 and on tp 2 x ep 2 with two replicas of each expert (world 8), MoE experts and LoRA adapters
included: each parameter has a placement naming a parameter of the one-process model, its box of
it holds exactly that model's values (float64), and the pieces counted once by the placements'
replication (not a tp copy, not an expert's second replica, one data-parallel replica) cover every
parameter of the whole model exactly once."""
from dataclasses import replace

import torch

import lora
import pretrain
import stack
from model import PRESETS, Transformer
from moe import add_moe
from placement import WHOLE, describe, full_name, placement_of
from tests.distributed import run_distributed
from topology import Topology

CFG = replace(PRESETS["tiny"], n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64,
              vocab_size=64, block_size=16)
LAYOUTS = [(2, 2, 2), (2, 1, 2)]  # (tp, pp, ep) on 8 ranks: dp 2 = ep 2, then dp 4 = ep 2 x 2
TARGETS = "wq,wo,w1,w2"            # column- and row-parallel layers, in attention and in experts


def adapt(model):
    lora.apply_lora(model, r=2, targets=TARGETS, seed=3)


def _pieces(rank, world):
    out = []
    for tp, pp, ep in LAYOUTS:
        topo = Topology(tp=tp, pp=pp, ep=ep)
        flags = ["--experts", "4", "--topk", "2", "--ep", str(ep)]
        cfg = pretrain.parse(flags)
        model = stack.build_model(CFG, topo, seed=0, device=torch.device("cpu"),
                                  dtype=torch.float64, experts=cfg.moe, adapt=adapt)
        boxes = describe(model)
        pieces = []
        for n, p in model.named_parameters():
            where = placement_of(p)
            assert where.name is not None and full_name(model, n) == where.name, n
            pieces.append((where, *boxes[p][1:], p.detach().clone()))
        out.append((topo.dp_rank, pieces))
    return out


def test_placements_put_the_whole_model_back_together():
    torch.manual_seed(0)
    whole = Transformer(CFG)
    add_moe(whole, 4, 2)
    adapt(whole)
    ref = {n: p.detach() for n, p in whole.named_parameters()}
    assert all(placement_of(p) == WHOLE for p in whole.parameters())  # nothing cut: the default
    results = run_distributed(_pieces, 8)
    for i, layout in enumerate(LAYOUTS):
        counted = {n: torch.zeros(t.shape, dtype=torch.int64) for n, t in ref.items()}
        for dp_rank, pieces in (r[i] for r in results):
            for where, shape, box, t in pieces:
                assert shape == list(ref[where.name].shape), (layout, where)
                cut = tuple(slice(s, s + n) for s, n in box)
                assert torch.equal(t, ref[where.name][cut]), (layout, where)
                assert ("tp" in where.replicated_over) == (where.tp_dim is None), (layout, where)
                expert = ".experts." in where.name
                assert ("expert_dp" in where.replicated_over) == expert, (layout, where)
                once = not where.ep_duplicate if where.expert_parallel else dp_rank == 0
                if once and not where.tp_duplicate:
                    counted[where.name][cut] += 1
        for n, c in counted.items():
            assert bool((c == 1).all()), (layout, n, c.unique())
