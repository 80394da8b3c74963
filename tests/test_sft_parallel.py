"""sft.py on the parallel layouts against one process on the same global batch: through sft.py on
data-parallel ranks (fp32), and every layout of stack.py on SFT batches in float64 (ZeRO-3, tp,
sequence parallel, pp with both schedules, all at once on 8 ranks, LoRA on tp and with ZeRO-3,
packed rows through all of them)."""
import contextlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import chat
import checkpoint
import data
import lora
import moe
import sft
import sft_data
import stack
import tensor_parallel
import training
from model import Transformer
from sft_fixtures import CFG, make_init, reverse_examples, write_jsonl
from tests.distributed import run_distributed
from topology import Topology


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftdp")
    # Long and short responses mixed, so that the ranks' micro-batches hold different numbers of
    # response tokens: a per-rank mean would then differ from the step's token mean, and the test
    # would see it.
    rows = reverse_examples(40) + [{"instruction": "Say x.", "output": "x" * n}
                                   for n in (3, 30, 9, 45, 1, 20)] * 4
    return {"init": make_init(d / "init"), "train": write_jsonl(d / "train.jsonl", rows),
            "val": write_jsonl(d / "val.jsonl", reverse_examples(10, seed=1)), "dir": d}


def argv(files, out, extra):
    return ["--init", str(files["init"]), "--data", str(files["train"]),
            "--val-data", str(files["val"]), "--out", str(out), "--batch-size", "8",
            "--grad-accum", "2", "--lr", "1e-2", "--warmup-steps", "1", "--max-steps", "4",
            "--eval-every", "2", "--samples", "0", "--log-every", "1", *extra]


def trainable(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def sft_rank(rank, world, files, out, extra):
    res = sft.main(argv(files, out, extra))
    return res["losses"], res["val_losses"], trainable(res["model"])


@pytest.mark.parametrize("extra", [["--zero", "0"],
                                   ["--zero", "2", "--lora-r", "4", "--lora-targets", "wq,wv,w2"]],
                         ids=["ddp", "zero2-lora"])
def test_data_parallel_sft_matches_one_process(tmp_path, files, extra):
    """Losses (train and held-out) and the trained parameters agree with one process to fp32
    rounding: only the summation order differs (two ranks' partial sums, then an all-reduce)."""
    one = sft.main(argv(files, tmp_path / "one", extra))
    ranks = run_distributed(sft_rank, 2, files, tmp_path / "two", extra)
    ref = trainable(one["model"])
    for losses, val_losses, params in ranks:
        assert losses == pytest.approx(one["losses"], rel=1e-5)
        assert val_losses == pytest.approx(one["val_losses"], rel=1e-5)
        assert params.keys() == ref.keys()
        for k in ref:
            # fp32, lr 1e-2: Adam divides each step by sqrt(v), which for an element whose gradients
            # are tiny amplifies their rounding; the worst element depends on the base's draw:
            # measured from 2.7e-7 to 6.8e-6 apart over three bases (make_init's seed 0, 1, 2).
            torch.testing.assert_close(params[k], ref[k], rtol=1e-4, atol=1e-5)
    if "--lora-r" in extra:
        assert all(".lora_" in k for k in ref)
        assert (tmp_path / "two" / "adapter.pt").exists()
        assert (checkpoint.find(tmp_path / "two")[0] / "rank1.pt").exists()


def _sft_layouts_world4(rank, world, files, out):
    packed = sft.main(argv(files, f"{out}/pp",
                           ["--tp", "2", "--pp", "2", "--microbatches", "2", "--pack"]))
    lora_z3 = sft.main(argv(files, f"{out}/z3", LORA_Z3))
    loaded = sft.main(argv(files, f"{out}/load",
                           ["--tp", "2", "--adapter", f"{out}/z3/adapter.pt", "--max-steps", "0"]))
    first = sft.main(argv(files, f"{out}/resume", LORA_Z3 + ["--stop-after", "2"]))
    second = sft.main(argv(files, f"{out}/resume", LORA_Z3 + ["--resume"]))
    resumed_exactly = first["losses"] + second["losses"] == lora_z3["losses"]
    return (packed["losses"], packed["val_losses"], lora_z3["losses"], loaded["val_losses"],
            resumed_exactly)


LORA_Z3 = ["--zero", "3", "--tp", "2", "--lora-r", "4", "--lora-targets", "wq,wo,w2"]


def test_sft_tp2_pp2_packed_and_lora_zero3_tp2_through_sft_py(tmp_path, files):
    """Through sft.py at world 4, fp32: tp 2 x pp 2 on packed rows against one process on padded
    rows (the step holds the same examples: the same losses); LoRA under ZeRO-3 x tp 2 against one
    process, its adapter.pt and merged.pt gathered whole (equal to the one process's files), the
    adapter loaded back onto tp 2, and the run stopped after 2 steps and resumed equal to the
    uninterrupted one, loss for loss."""
    one = sft.main(argv(files, tmp_path / "one", ["--microbatches", "2"]))
    one_lora = sft.main(argv(files, tmp_path / "one_lora", LORA_Z3[4:]))
    for packed, val, lora_losses, loaded_val, resumed in run_distributed(_sft_layouts_world4, 4,
                                                                         files, str(tmp_path)):
        assert resumed
        assert packed == pytest.approx(one["losses"], rel=1e-5)
        assert val == pytest.approx(one["val_losses"], rel=1e-5)
        assert lora_losses == pytest.approx(one_lora["losses"], rel=1e-5)
        assert loaded_val == [pytest.approx(one_lora["val_losses"][-1], rel=1e-5)]
    for name, key in (("adapter.pt", "adapter"), ("merged.pt", "model")):
        ours, ref = (torch.load(tmp_path / d / name, weights_only=False)[key]
                     for d in ("z3", "one_lora"))
        assert ours.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} {k}: {m}")


def moe_init(path):
    """An MoE base as pretrain.py --experts 4 --topk 2 writes it: the experts' flags in its args."""
    flags = {"experts": 4, "topk": 2, "moe_layers": "all", "capacity_factor": None,
             "aux_loss_weight": 1e-2}
    torch.manual_seed(0)
    model = moe.with_experts(Transformer(CFG), moe.MoEConfig(**flags))
    cfg = {**asdict(CFG), "attn": "-", "activation_checkpointing": False}
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": cfg, "tokenizer": "bytes",
                "args": flags}, path / "model.pt")
    return path / "model.pt"


def _sft_ep(rank, world, files, out):
    flags = ["--ep", "2", "--grad-clip", "0.05"]
    return sft.main(argv(files, out, flags))["losses"], _norms(Path(out))


def _norms(out):
    return [json.loads(l)["grad_norm"] for l in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in l]


def test_sft_of_an_moe_base_with_expert_parallelism(tmp_path, files):
    """An MoE base keeps its experts; --ep 2 at world 2 (each rank 2 of the 4 experts of each layer,
    dropless) against one process taking the same two per-rank halves as 2 accumulation micro-steps
    (the balancing loss is per micro-batch): the same losses and clipped gradient norms (fp32)."""
    moe_files = {**files, "init": moe_init(tmp_path / "moe")}
    one = sft.main(argv(moe_files, tmp_path / "one", ["--grad-accum", "4", "--grad-clip", "0.05"]))
    assert min(_norms(tmp_path / "one")) > 0.05
    for losses, norms in run_distributed(_sft_ep, 2, moe_files, str(tmp_path / "ep")):
        assert losses == pytest.approx(one["losses"], rel=1e-5)
        assert norms == pytest.approx(_norms(tmp_path / "one"), rel=1e-5)


def _sft_ep_lora(rank, world, files, out):
    flags = ["--ep", "2", "--grad-clip", "0.05", *EXPERT_LORA]
    return sft.main(argv(files, out, flags))["losses"], _norms(Path(out))


EXPERT_LORA = ["--lora-r", "4", "--lora-targets", "wq,w1,w2"]


def test_lora_on_the_experts_of_an_moe_base_with_expert_parallelism(tmp_path, files):
    """Adapters on the experts' linears live where their expert does (placement.py): under --ep 2
    the data-parallel group neither broadcasts nor averages them, their expert-data group does; the
    same losses and clipped norms as one process over the two halves as micro-steps (fp32)."""
    moe_files = {**files, "init": moe_init(tmp_path / "moe")}
    one = sft.main(argv(moe_files, tmp_path / "one",
                        ["--grad-accum", "4", "--grad-clip", "0.05", *EXPERT_LORA]))
    for losses, norms in run_distributed(_sft_ep_lora, 2, moe_files, str(tmp_path / "ep")):
        assert losses == pytest.approx(one["losses"], rel=1e-5)
        assert norms == pytest.approx(_norms(tmp_path / "one"), rel=1e-5)


# ---------------------------------------------------------------------------- every layout, float64
# stack.py's and training.py's pieces on SFT batches (masked labels, rows of different lengths), in
# float64: the model built from one base state dict, sliced and adapted, stepped with clipping
# active; against one process on the same batches.
ENC = data.get_tokenizer("bytes")
EOT = data.eot_id(ENC)
STEPS, N_MICRO, CLIP = 3, 4, 0.05          # 4 micro-batches of 2 examples per step
LINES = reverse_examples(12) + [{"instruction": "Say x.", "output": "x" * n}
                                for n in (3, 30, 9, 45)]
ROWS = sft_data.tokenize([(f"f:{i}", chat.to_messages(l, "-")) for i, l in enumerate(LINES)],
                         ENC, CFG.block_size)[0]
torch.manual_seed(0)
BASE = Transformer(CFG).state_dict()
TARGETS = "wq,wo,w1,w2"                  # column- and row-parallel layers both


def step_batches(step, multiple, packed):
    """The step's N_MICRO micro-batches: long and short responses mixed, so label counts differ."""
    idx = torch.randperm(len(ROWS),
                         generator=torch.Generator().manual_seed(step))[:2 * N_MICRO].tolist()
    make = sft_data.pack if packed else sft_data.collate
    return [make([ROWS[i] for i in idx[2 * m:2 * m + 2]], EOT,
                 *([CFG.block_size] if packed else []), multiple)
            for m in range(N_MICRO)]


def train_sft(topo, tp, pp, schedule, zero, sp, use_lora, packed):
    cfg = sft.parse(["--zero", str(zero), "--lr", "1e-2", "--weight-decay", "0.1",
                     "--bucket-mb", "0.01"])

    def adapt(model):
        lora.apply_lora(model, r=4, alpha=8.0, targets=TARGETS, seed=0)
    model = stack.build_model(CFG, topo, 0, torch.device("cpu"), torch.float64, sp, weights=BASE,
                              adapt=adapt if use_lora else None)
    module, opt = stack.build_training(model, cfg, torch.float64, topo)
    losses, norms = [], []
    for step in range(STEPS):
        batches = step_batches(step, tp if sp else 1, packed)
        mine = batches[topo.dp_rank * N_MICRO // topo.dp:(topo.dp_rank + 1) * N_MICRO // topo.dp]
        loss = training.forward_backward(model if pp > 1 else module, mine, topo, schedule,
                                         opt.scale_loss, "cpu", opt.no_sync)
        norm, _ = opt.step(CLIP)
        opt.zero_grad()
        losses.append(training.mean_over_dp(loss, topo).item())
        norms.append(norm)
    # LoRA under ZeRO: only the adapters reach the optimizer (the frozen base: no state, no shards).
    stepped = [p for g in opt.param_groups for p in g["params"]] if zero == 0 or topo.dp == 1 else [
        p for u in opt.units for p in u.params]
    only_adapters = ({id(p) for p in stepped}
                     == {id(p) for n, p in model.named_parameters() if ".lora_" in n})
    with opt.gathered() if zero == 3 and topo.dp > 1 else contextlib.nullcontext():
        # the adapters whole, by their names in the whole model (gathered over tp and pp)
        if use_lora:
            trained = lora.lora_state_dict(model, topo)
        else:
            trained = {lora.full_name(model, n): p.detach().clone()
                       for n, p in model.named_parameters()}
    return losses, norms, trained, only_adapters


def _layouts(rank, world, layouts):
    return [(Topology(tp=l[0], pp=l[1]).tp_rank, train_sft(Topology(tp=l[0], pp=l[1]), *l))
            for l in layouts]


def check_layouts(layouts, world):
    refs = {lo: train_sft(Topology(), 1, 1, "1f1b", 0, False, lo, False) for lo in (False, True)}
    # clipping is active at every step
    assert min(refs[False][1]) > CLIP and min(refs[True][1]) > CLIP
    for rank_results in run_distributed(_layouts, world, layouts):
        for layout, (tp_rank, result) in zip(layouts, rank_results):
            losses, norms, trained, only_adapters = result
            tp, use_lora = layout[0], layout[5]
            ref_losses, ref_norms, ref_trained, _ = refs[use_lora]
            # float64, the same arithmetic up to summation order (partial sums over ranks and
            # micro-batches, packed rows' shorter or longer matmuls): 3 Adam steps stay near 1e-13.
            assert losses == pytest.approx(ref_losses, rel=1e-10), layout
            assert norms == pytest.approx(ref_norms, rel=1e-10), layout
            if use_lora:
                assert trained.keys() == ref_trained.keys() and only_adapters, layout
            for name, p in trained.items():
                d = None if use_lora else tensor_parallel.split_dim(name)
                want = (ref_trained[name] if d is None
                        else ref_trained[name].chunk(tp, dim=d)[tp_rank])
                torch.testing.assert_close(p, want, rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"{layout} {name}: {m}")


def test_sft_every_layout_matches_one_process_world2():
    """World 2: ZeRO-3 over dp 2; tp 2, and tp 2 with sequence parallelism on packed rows; pp 2 with
    1F1B, and GPipe on packed rows (positions and document ids reach every stage from the data);
    LoRA on tp 2 (adapters split to match the column- and row-parallel layers) and LoRA with ZeRO-3
    (only adapters sharded)."""
    check_layouts([(1, 1, "1f1b", 3, False, False, False), (2, 1, "1f1b", 0, False, False, False),
                   (2, 1, "1f1b", 0, True, False, True), (1, 2, "1f1b", 0, False, False, False),
                   (1, 2, "gpipe", 0, False, False, True), (2, 1, "1f1b", 0, False, True, False),
                   (1, 1, "1f1b", 3, False, True, False)], 2)


def test_sft_zero1_tp2_pp2_and_lora_zero3_tp2_pp2_world8():
    """World 8 = dp 2 x pp 2 x tp 2: full fine-tuning under ZeRO-1, packed LoRA under ZeRO-3."""
    check_layouts([(2, 2, "1f1b", 1, False, False, False), (2, 2, "1f1b", 3, False, True, True)], 8)


def _lora_tp(rank, world):
    """LoRA on tp 2: step-0 logits, the trainable count, and after 2 steps the adapted logits (full
    vocabulary), the whole adapters and the whole merged state dict, and the logits after merging in
    place on each rank."""
    topo = Topology(tp=2)
    x = torch.tensor([ROWS[0][0][:40], ROWS[1][0][:40]])

    def build(adapt=None):
        model = stack.build_model(CFG, topo, 0, torch.device("cpu"), torch.float64, weights=BASE,
                                  adapt=adapt)
        tensor_parallel.set_gather_output(model, True)
        return model
    base, adapted = build(), build(lambda m: lora.apply_lora(m, r=4, alpha=8.0,
                                                             targets=TARGETS, seed=0))
    step0_equal = torch.equal(base(x)[0], adapted(x)[0])
    own = sum(p.numel() for p in adapted.parameters()
              if p.requires_grad and not tensor_parallel.is_tp_duplicate(p))
    _, opt = stack.build_training(adapted, sft.parse(["--lr", "1e-2"]), torch.float64, topo)
    for step in range(2):
        training.forward_backward(adapted, step_batches(step, 1, False), topo, "1f1b",
                                  opt.scale_loss, "cpu")
        opt.step(0.0)
        opt.zero_grad()
    logits = adapted(x)[0].detach()
    adapter = lora.lora_state_dict(adapted, topo)
    merged = lora.merged_state_dict(adapted, {k: v.double() for k, v in BASE.items()}, adapter)
    in_place = lora.merge_lora(adapted)(x)[0].detach()
    return step0_equal, own, base(x)[0].detach(), logits, merged, in_place


def test_lora_on_tp2_starts_at_the_base_counts_r_d_in_plus_d_out_and_merges():
    results = run_distributed(_lora_tp, 2)
    d, q, ff = CFG.d_model, CFG.n_head * CFG.head_dim, CFG.d_ff
    # r = 4 on wq, wo, w1, w2
    expected = CFG.n_layer * 4 * ((d + q) + (q + d) + (d + ff) + (ff + d))
    assert all(r[0] for r in results)  # B = 0: the adapted model's logits are the base's, exactly
    # The ranks' slices of B (column-parallel) and A (row-parallel), and once the unsliced factors.
    assert sum(r[1] for r in results) == expected
    plain = Transformer(CFG).double()
    plain.load_state_dict(results[0][4])
    x = torch.tensor([ROWS[0][0][:40], ROWS[1][0][:40]])
    for _, _, base_logits, logits, merged, in_place in results:
        # the adapters did learn something
        assert not torch.allclose(logits, base_logits, atol=1e-4)
        # merged whole = adapted, tp 2
        torch.testing.assert_close(plain(x)[0], logits, rtol=1e-10, atol=1e-12)
        # merged in place, per rank
        torch.testing.assert_close(in_place, logits, rtol=1e-10, atol=1e-12)
