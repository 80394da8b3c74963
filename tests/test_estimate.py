"""estimate.py: counts for any shape, the per-GPU memory and communication formulas, one line per
bad flag; measure_memory.py: the bytes a step holds, on one and on two ranks, against them."""
import pytest
import torch

import estimate
import measure_memory
import pretrain
from model import ModelConfig, Transformer


def test_custom_shape_counts_the_model_as_built():
    est = estimate.main(["--n-layer", "3", "--d-model", "64", "--n-head", "4", "--n-kv-head", "2",
                         "--d-ff", "160", "--vocab-size", "250", "--seq-len", "96"])
    real = Transformer(ModelConfig(n_layer=3, d_model=64, n_head=4, n_kv_head=2, d_ff=160,
                                   vocab_size=256, block_size=96))
    # vocabulary padded to 256, as pretrain.py
    assert est["params"] == sum(p.numel() for p in real.parameters())
    assert est["flops_per_token"] == 6 * (est["params"] - 256 * 64) + 6 * 3 * 64 * 96
    # one GPU holds the whole model, embedding and head included
    assert est["memory"]["psi"] == est["params"]


def test_params_picks_a_llama_like_shape():
    est = estimate.main(["--params", "7e9"])
    cfg = est["config"]
    assert (cfg.n_layer, cfg.d_model, cfg.n_head) == (32, 4096, 32)  # Llama-2 7B's
    assert est["params"] == pytest.approx(7e9, rel=0.05)


def test_activation_formulas_match_the_paper():
    # Korthikanti et al.'s GPT-3 175B example (s 2048, h 12288, a 96, t 8, b 1), per layer / sbh.
    s, h, a, t = 2048, 12288, 96, 8
    per = lambda **kw: estimate.activations_per_layer(s, 1, h, a, **kw) / (s * h)  # noqa: E731
    assert per() == pytest.approx(34 + 5 * 96 * 2048 / 12288)
    assert per(t=t) == pytest.approx(10 + 24 / 8 + 10)
    assert per(t=t, sp=True) == pytest.approx(34 / 8 + 10)
    assert per(t=t, recompute="selective") == pytest.approx(13)
    assert per(t=t, sp=True, recompute="full") == pytest.approx(2 / 8)


def test_memory_and_communication_per_gpu_for_a_3d_layout():
    argv = ["--n-layer", "4", "--d-model", "64", "--n-head", "4", "--d-ff", "128", "--vocab-size",
            "256", "--seq-len", "32", "--gpus", "8", "--tp", "2", "--pp", "2", "--microbatches",
            "4", "--batch-size", "16"]
    for zero in (0, 1, 2, 3):
        est = estimate.main(argv + ["--zero", str(zero)])
        mem, model = est["memory"], Transformer(est["config"])
        blocks = sum(p.numel() for p in model.blocks[:2].parameters())
        last = blocks + model.lm_head.weight.numel() + model.norm.weight.numel()
        # the busiest stage, halved by tp
        psi = max(blocks + model.tok_emb.weight.numel(), last) / 2
        div = {k: 2 if zero >= z else 1 for k, z in (("weights", 3), ("gradients", 2),
                                                     ("optimizer states", 1))}
        assert mem["weights"] == 2 * psi / div["weights"]
        assert mem["gradients"] == 2 * psi / div["gradients"]
        assert mem["optimizer states"] == 12 * psi / div["optimizer states"]
        assert est["micro_batch"] == 2 and est["bubble"] == pytest.approx(1 / 5)
        sbh = 32 * 2 * 64
        per_layer = sbh * (10 + 24 / 2 + 5 * 4 * 32 / (64 * 2))
        # 2 layers per stage x 2 micro-batches in flight (1F1B, p = 2)
        assert mem["activations"] == pytest.approx(per_layer * 2 * 2)
        ring = 1 / 2  # (k - 1) / k for k = 2
        assert est["comm"]["dp"] == 2 * (2 if zero in (0, 2) else 3) * ring * psi
        # 4 all-reduces x 2 layers x 4 micro-batches
        assert est["comm"]["tp"] == 2 * 4 * 2 * ring * sbh * 2 * 4
        assert est["comm"]["pp"] == 2 * 2 * sbh * 4


def test_bad_input_gets_one_clear_line(capsys):
    cases = [(["--gpus", "0"], "--gpus must be at least 1, got 0"),
             (["--gpus", "-2"], "--gpus must be at least 1, got -2"),
             (["--mfu", "0"], "--mfu must be in (0, 1]"),
             (["--mfu", "1.5"], "--mfu must be in (0, 1]"),
             (["--tokens=-1e9"], "--tokens must be at least 1"),
             (["--mfu", "nan"], "--mfu must be a finite number"),
             (["--model", "tiny", "--seq-len", "512"],
              "--seq-len 512 is beyond the context of model 'tiny' (256)"),
             (["--gpus", "8", "--tp", "5"], "--gpus 8 is not a multiple of --tp 5 x --pp 1"),
             (["--model", "gpt2-124m", "--gpus", "5", "--tp", "5"],
              "--tp 5 does not divide the model's n_head 12"),
             (["--gpus", "8", "--tp", "2", "--pp", "2", "--batch-size", "3"],
              "--batch-size 3 does not divide"),
             (["--model", "tiny", "--gpus", "8", "--pp", "8"],
              "--pp 8 is more stages than the model's 4 layers"),
             (["--n-head", "7"], "--n-head 7 must divide --d-model 768"),
             (["--params", "-1"], "--params must be positive"),
             (["--params", "1e30"], "--params 1e+30: the shapes built here (d = 128 x layers, 1 "
                                    "to 255 layers) span"),
             (["--params", "1000"], "--params 1000: the shapes built here")]
    for argv, expected in cases:
        # pretrain.py --estimate runs estimate.py on its own flags (it has no --n-head, --params)
        mains = [(estimate.main, [])] + ([(pretrain.main, ["--estimate"])]
                                         if argv[0] not in ("--n-head", "--params")
                                         else [])
        for main, prefix in mains:
            with pytest.raises(SystemExit) as e:
                main(prefix + argv)
            assert e.value.code == 2
            err = capsys.readouterr().err.strip()
            assert expected in err and "\n" not in err and "Traceback" not in err, (argv, err)


# -------------------------------------------------------------------- measured against the formulas
SMALL = dict(n_layer=2, d_model=64, n_head=4, n_kv_head=4, d_ff=160, vocab_size=256, block_size=32)


def test_one_step_holds_what_the_formulas_say():
    s, b, sbh = 32, 2, 32 * 2 * 64
    plain = measure_memory.measure_step(ModelConfig(**SMALL), s, b)
    n = sum(p.numel() for p in Transformer(ModelConfig(**SMALL)).parameters())
    states = (plain["weights"], plain["gradients"], plain["optimizer states"])
    assert states == (2 * n, 2 * n, 12 * n)
    # This model's parts, exactly: each RMSNorm keeps its fp32 input and normalised x (4 + 4 bytes),
    # its bf16 output (2), the fp32 rsqrt per position and an fp32 copy of its weight; SwiGLU keeps
    # w1 x, silu(w1 x), w3 x and their product, 4 tensors of width d_ff in bf16.
    norm = (4 + 4 + 2) * sbh + 4 * s * b + 4 * 64
    assert plain["parts"]["attn_norm"] == plain["parts"]["mlp_norm"] == norm
    assert plain["parts"]["mlp"] == 4 * 2 * s * b * 160
    ckpt = measure_memory.measure_step(ModelConfig(**SMALL, activation_checkpointing=True), s, b)
    full = estimate.activations_per_layer(s, b, 64, 4, recompute="full")
    assert ckpt["activations per layer"] == full
    naive = measure_memory.measure_step(ModelConfig(**SMALL, attn="naive"), s, b)
    # the a s^2 b scores, saved
    assert naive["parts"]["attn"] > plain["parts"]["attn"] + 4 * b * s * s * 4


def test_held_activations_agree_with_the_saved_tensor_hooks():
    # Two independent meters: saved-tensor hooks (pipeline.py) and live storages after the forward.
    from pipeline import ActivationMeter
    # in bf16 (in fp32 a norm keeps its input itself)
    model = Transformer(ModelConfig(**SMALL)).to(torch.bfloat16)
    saved, held = ActivationMeter(model), measure_memory.HeldActivations(model)
    per_block = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: per_block.append(-saved.now))
        block.register_forward_hook(lambda *_: per_block.__setitem__(-1, per_block[-1] + saved.now))
    x = torch.randint(0, 256, (2, 33))
    with saved.hooks(), held:
        model(x[:, :-1], x[:, 1:])
    got = held.held()
    assert per_block == [sum(v for tag, v in got.items() if tag and tag[0] == i) for i in range(2)]


def _held_on_two_ranks(rank, world):
    """Per rank: ZeRO stages' model states held after a step; activations per layer under tp 2, with
    and without sequence parallelism (bf16, one step)."""
    import tensor_parallel
    from amp import DynamicLossScaler, cast_model
    from topology import Topology
    from zero import ZeroOptimizer
    cfg = ModelConfig(**SMALL)
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    states = {}
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = cast_model(Transformer(cfg), torch.bfloat16)
        opt = ZeroOptimizer(model, [{"params": list(model.parameters())}], torch.optim.AdamW,
                            DynamicLossScaler(enabled=False), None, stage)
        module = opt.module
        for step in range(2):  # (Adam's moments exist from the first step on)
            _, loss = module(x[rank:rank + 1, :-1], x[rank:rank + 1, 1:])
            loss.backward()
            states[stage] = opt.memory()  # everything a step needs is held now
            opt.step(1.0)
            opt.zero_grad()
    acts = {}
    for sp in (False, True):
        torch.manual_seed(0)
        model = cast_model(Transformer(cfg), torch.bfloat16)
        tensor_parallel.parallelize(model, Topology(tp=2), sequence_parallel=sp)
        meter = measure_memory.HeldActivations(model)
        with meter:
            _, loss = model(x[:, :-1], x[:, 1:])
        acts[sp] = sum(v for tag, v in meter.held().items() if tag) / cfg.n_layer
        loss.backward()
    return states, acts


def test_zero_stages_and_tensor_parallel_hold_what_the_formulas_say():
    from tests.distributed import run_distributed
    n = sum(p.numel() for p in Transformer(ModelConfig(**SMALL)).parameters())
    one = measure_memory.measure_step(ModelConfig(**SMALL), 32, 2)["activations per layer"]
    for states, acts in run_distributed(_held_on_two_ranks, 2):
        for stage in (1, 2, 3):
            want = estimate.zero_table(n, 2)[stage]
            want = {k: want[k] for k in ("params", "grads", "optimizer")}
            assert states[stage] == want, (stage, states[stage])
        # tp halves the attention's and the MLP's insides but not the norms (replicated on both
        # ranks); sp halves the norms too, but keeps whole-sequence tensors around its all-gathers:
        # it saves less than the norms' half.
        sbh = 32 * 2 * 64
        norms = 2 * ((4 + 4 + 2) * sbh + 4 * 32 * 2 + 4 * 64)
        assert acts[False] == pytest.approx(norms + (one - norms) / 2, rel=0.02)
        assert acts[False] - norms / 2 < acts[True] < acts[False]


def test_expert_parallelism_divides_the_experts_and_adds_all_to_alls():
    argv = ["--model", "tiny", "--experts", "4", "--topk", "2", "--gpus", "4", "--batch-size", "8"]
    dense, ep = estimate.main(argv), estimate.main(argv + ["--ep", "2"])
    model = Transformer(ModelConfig(**{**SMALL, "n_layer": 4, "d_model": 128, "d_ff": 384,
                                       "n_kv_head": 2, "block_size": 256}))
    from moe import add_moe
    add_moe(model, 4, 2)
    experts = sum(p.numel() for name, p in model.named_parameters() if "experts" in name)
    assert dense["memory"]["psi"] - ep["memory"]["psi"] == experts / 2
    sbh = 256 * 2 * 128  # 8 sequences over 4 data-parallel ranks: b = 2
    assert ep["comm"]["ep"] == 2 * 4 * 2 * sbh * (1 / 2) * 4 and "ep" not in dense["comm"]
