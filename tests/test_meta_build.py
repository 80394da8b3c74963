"""stack.build_model builds on the meta device and allocates only this rank's pieces: each piece
equals the same part of the one-process model (float64, exactly) whatever the layout, LoRA and
experts included; no rank ever holds more than its share while building; --init weights (a run's
folder, a consolidated file, a Hugging Face folder) are read block by block onto a layout, equal to
the whole weights' slices."""
import re
import weakref
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoint
import init
import lora
import model as model_lib
import pipeline
import pretrain
import stack
import tensor_parallel
import weights
from model import PRESETS, Transformer
from moe import add_moe
from tests.distributed import run_distributed
from topology import Topology

CFG = replace(PRESETS["tiny"], n_layer=4, d_model=32, n_head=8, n_kv_head=4, d_ff=64, vocab_size=64,
              block_size=16)
LAYOUTS = [  # (tp, pp, ep, experts, LoRA targets) on 4 ranks
    (2, 1, 1, 0, None), (1, 2, 1, 0, None), (2, 2, 1, 0, None), (4, 1, 1, 0, None),
    (1, 1, 2, 4, None), (2, 1, 2, 4, None), (2, 2, 1, 0, "wq,wo,w1,w2"), (2, 1, 2, 4, "wv,w2")]


def flags(ep, experts):
    argv = ["--experts", str(experts), "--topk", "2", "--ep", str(ep)] if experts else []
    return pretrain.parse(argv).moe


def adapter(targets):
    return (lambda m: lora.apply_lora(m, r=2, targets=targets, seed=3)) if targets else None


def expected(ref, name, tp, tp_rank):
    """The piece of the one-process model's parameter `name` a tp rank holds:
    tensor_parallel.split_dim's dimension cut in tp (an expert's as the MLP's), the LoRA factors as
    lora.py cuts them (B by rows under a column-parallel weight, A by columns under a row-parallel
    one), everything else whole."""
    # an expert is split as the MLP it replaces
    layer, _, leaf = re.sub(r"experts\.\d+\.", "", name).rpartition(".")
    d = tensor_parallel.split_dim(layer + ".weight" if leaf in ("lora_A", "lora_B")
                                  else f"{layer}.{leaf}")
    if leaf in ("lora_A", "lora_B") and (d, leaf) not in ((0, "lora_B"), (1, "lora_A")):
        d = None
    return ref[name] if d is None or tp == 1 else ref[name].chunk(tp, dim=d)[tp_rank]


def one_process(ep, experts, targets):
    torch.manual_seed(0)
    whole = Transformer(CFG)
    if experts:
        add_moe(whole, experts, 2)
    if targets:
        adapter(targets)(whole)
    return {n: p.detach().double() for n, p in whole.named_parameters()}


def _pieces(rank, world):
    out = []
    for tp, pp, ep, experts, targets in LAYOUTS:
        topo = Topology(tp=tp, pp=pp, ep=ep)
        model = stack.build_model(CFG, topo, seed=0, device=torch.device("cpu"),
                                  dtype=torch.float64, experts=flags(ep, experts),
                                  adapt=adapter(targets))
        out.append((topo.tp_rank, {lora.full_name(model, n): p.detach()
                                   for n, p in model.named_parameters()}))
    return out


def test_every_rank_builds_exactly_its_piece_of_the_one_process_model():
    refs = [one_process(ep, experts, targets) for _, _, ep, experts, targets in LAYOUTS]
    held = [set() for _ in LAYOUTS]
    for rank_results in run_distributed(_pieces, 4):
        for i, (layout, ref, (tp_rank, params)) in enumerate(zip(LAYOUTS, refs, rank_results)):
            for name, p in params.items():
                assert (p.dtype == torch.float64
                        and torch.equal(p, expected(ref, name, layout[0], tp_rank))), \
                    (layout, name)
                held[i].add(name)
    for layout, ref, names in zip(LAYOUTS, refs, held):  # every parameter is somewhere
        assert names == set(ref), layout


# ---------------------------------------------------------------------------- memory while building
class LiveBytes(TorchDispatchMode):
    """Bytes of CPU memory alive, counted from the ops that create storage (every op's outputs whose
    storage is new), each released when its storage dies (torch keeps a storage's Python object as
    long as the storage itself lives: the finalizer runs when the last tensor or parameter using it
    is gone); `peak` the most at once."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and storage.nbytes():
                    self.live.add(key)
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self.release, key, storage.nbytes())
        return out

    def release(self, key, n):
        self.live.discard(key)
        self.now -= n


def _peak_bytes(rank, world, tp, pp, meta):
    topo = Topology(tp=tp, pp=pp)
    with LiveBytes() as mode:
        if meta:
            model = stack.build_model(CFG, topo, seed=0, device=torch.device("cpu"),
                                      dtype=torch.float32)
        else:  # what building meant before: the whole model, then cut
            torch.manual_seed(0)
            whole = Transformer(CFG)
            model = tensor_parallel.parallelize(pipeline.keep_stage(whole, topo), topo)
        mine = sum(p.numel() * p.element_size() for p in model.parameters())
    return mode.peak, mine


@pytest.mark.parametrize("tp, pp", [(2, 1), (2, 2)])
def test_no_rank_holds_more_than_its_share_while_building(monkeypatch, tp, pp):
    """The whole model is never allocated: a rank's peak is its own parameters plus one block of
    draws (made small here, as a large model's are small next to its parameters), against the whole
    model when it is built first."""
    monkeypatch.setattr(init, "ELEMENTS_PER_DRAW", 64)
    whole = sum(p.numel() * 4 for p in Transformer(CFG).parameters())
    for meta in (True, False):
        for peak, mine in run_distributed(_peak_bytes, tp * pp, tp, pp, meta):
            assert mine < whole * 0.6
            if meta:
                # two blocks of draws, the RoPE tables
                assert peak <= mine + 2 * 64 * 4 + 4096, (peak, mine)
            else:
                assert peak >= whole


# --------------------------------------------------------------------------- --init, block by block
def _init_onto_layouts(rank, world, out):
    """Save seed 0's model from a tp 2 layout (a run's folder), consolidate it and export it to a
    Hugging Face folder (rank 0), then build tp 2 and pp 2 models from each of the three, with
    another seed."""
    topo = Topology(tp=2)
    cfg = pretrain.parse([])
    model = stack.build_model(CFG, topo, seed=0, device=torch.device("cpu"), dtype=torch.float64)
    _, opt = stack.build_training(model, cfg, torch.float64, topo)
    config = model_lib.config_dict(replace(CFG, attn="-"))
    checkpoint.save(out / "run", 1, model, opt, topo,
                    {"model_config": config, "tokenizer": "bytes"})
    if rank == 0:
        weights.main(["consolidate", str(out / "run"), str(out / "model.pt")])
        weights.main(["export-hf", str(out / "run"), str(out / "hf")])
    torch.distributed.barrier()
    got = {}
    for source in ("run", "model.pt", "hf"):
        init = weights.load_weights(out / source)
        assert init["model_config"] == config
        for tp, pp in ((2, 1), (1, 2)):
            topo = Topology(tp=tp, pp=pp)
            m = stack.build_model(CFG, topo, seed=1, device=torch.device("cpu"),
                                  dtype=torch.float64, weights=init["model"])
            got[source, tp, pp] = (topo.tp_rank, {lora.full_name(m, n): p.detach()
                                                  for n, p in m.named_parameters()})
    return got


def test_init_weights_are_read_onto_any_layout(tmp_path):
    ref, held = one_process(1, 0, None), {}
    for got in run_distributed(_init_onto_layouts, 2, tmp_path):
        for (source, tp, pp), (tp_rank, params) in got.items():
            for name, p in params.items():
                assert torch.equal(p, expected(ref, name, tp, tp_rank)), (source, tp, pp, name)
                held.setdefault((source, tp, pp), set()).add(name)
    assert len(held) == 6 and all(names == set(ref) for names in held.values())


def test_init_weights_that_do_not_fit_are_one_line(tmp_path):
    sd = {n: p.detach() for n, p in Transformer(CFG).named_parameters()}
    topo = Topology()
    cpu = torch.device("cpu")
    for weights_given, message in [
            ({k: v for k, v in sd.items() if k != "blocks.0.attn.wq.weight"},
             "the weights have no blocks.0.attn.wq"),
            (sd | {"norm.weight": torch.ones(8)},
             r"the weights' norm.weight has shape \[8\], the model's \[32\]"),
            (sd | {"blocks.0.mlp.router.weight": sd["norm.weight"]},
             "the weights hold blocks.0.mlp.router.weight, which this model has not")]:
        with pytest.raises(checkpoint.CheckpointError, match=message):
            stack.build_model(CFG, topo, 0, cpu, torch.float32, weights=weights_given)


def test_each_parameter_gets_its_rules_distribution():
    """init_rule, drawn: ones for gains, N(0, 0.02) for embeddings and linears, N(0, 0.02/sqrt(2L))
    for the residual branches' output projections, U(+-1/sqrt(fan_in)) for experts and routers; the
    whole model's names reach the right rule."""
    def draw(name, shape, n_layer=8):
        return init.init_values(name, shape, init.whole(shape), seed=7, n_layer=n_layer)

    assert torch.equal(draw("blocks.0.attn_norm.weight", (64,)), torch.ones(64))
    for name, std in [("tok_emb.weight", 0.02), ("blocks.3.attn.wq.weight", 0.02),
                      ("blocks.3.attn.wo.weight", 0.005), ("blocks.3.mlp.w2.weight", 0.005)]:
        x = draw(name, (512, 256))
        assert abs(x.mean()) < 0.03 * std and abs(x.std() / std - 1) < 0.01, name
    bound = 1 / 16
    for name in ("blocks.1.mlp.experts.2.w1.weight", "blocks.1.mlp.router.weight"):
        x = draw(name, (512, 256))
        assert x.abs().max() <= bound and x.abs().max() > 0.999 * bound, name
        assert abs(x.std() / (bound / 3 ** 0.5) - 1) < 0.01, name
    m = Transformer(replace(CFG, d_model=256, n_head=8, n_kv_head=8, d_ff=512, vocab_size=512))
    stds = {n: p.std().item() for n, p in m.named_parameters() if p.dim() == 2}
    assert abs(stds["blocks.0.attn.wo.weight"] / (0.02 / (2 * CFG.n_layer) ** 0.5) - 1) < 0.02
    assert abs(stds["blocks.0.attn.wq.weight"] / 0.02 - 1) < 0.02
