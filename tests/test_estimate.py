"""estimate.py: counts for any shape, the per-GPU memory and communication formulas, one line per bad flag."""
import pytest
import torch

import estimate
import pretrain
from model import ModelConfig, Transformer


def test_custom_shape_counts_the_model_as_built():
    est = estimate.main(["--n-layer", "3", "--d-model", "64", "--n-head", "4", "--n-kv-head", "2", "--d-ff", "160",
                         "--vocab-size", "250", "--seq-len", "96"])
    real = Transformer(ModelConfig(n_layer=3, d_model=64, n_head=4, n_kv_head=2, d_ff=160, vocab_size=256,
                                   block_size=96))
    assert est["params"] == sum(p.numel() for p in real.parameters())  # vocabulary padded to 256, as pretrain.py
    assert est["flops_per_token"] == 6 * (est["params"] - 256 * 64) + 12 * 3 * 64 * 96
    assert est["memory"]["psi"] == est["params"]  # one GPU holds the whole model, embedding and head included


def test_params_picks_a_llama_like_shape():
    est = estimate.main(["--params", "7e9"])
    cfg = est["config"]
    assert (cfg.n_layer, cfg.d_model, cfg.n_head) == (32, 4096, 32)  # Llama-2 7B's
    assert est["params"] == pytest.approx(7e9, rel=0.05)


def test_activation_formulas_match_the_paper():
    # Korthikanti et al.'s GPT-3 175B example: s 2048, h 12288, a 96, t 8, b 1 (bytes per layer / sbh).
    s, h, a, t = 2048, 12288, 96, 8
    per = lambda **kw: estimate.activations_per_layer(s, 1, h, a, **kw) / (s * h)  # noqa: E731
    assert per() == pytest.approx(34 + 5 * 96 * 2048 / 12288)
    assert per(t=t) == pytest.approx(10 + 24 / 8 + 10)
    assert per(t=t, sp=True) == pytest.approx(34 / 8 + 10)
    assert per(t=t, recompute="selective") == pytest.approx(13)
    assert per(t=t, sp=True, recompute="full") == pytest.approx(2 / 8)


def test_memory_and_communication_per_gpu_for_a_3d_layout():
    argv = ["--n-layer", "4", "--d-model", "64", "--n-head", "4", "--d-ff", "128", "--vocab-size", "256",
            "--seq-len", "32", "--gpus", "8", "--tp", "2", "--pp", "2", "--microbatches", "4", "--batch-size", "16"]
    for zero in (0, 1, 2, 3):
        est = estimate.main(argv + ["--zero", str(zero)])
        mem, model = est["memory"], Transformer(est["config"])
        blocks = sum(p.numel() for p in model.blocks[:2].parameters())
        last = blocks + model.lm_head.weight.numel() + model.norm.weight.numel()
        psi = max(blocks + model.tok_emb.weight.numel(), last) / 2  # the busiest stage, halved by tp
        div = {k: 2 if zero >= z else 1 for k, z in (("weights", 3), ("gradients", 2), ("optimizer states", 1))}
        assert mem["weights"] == 2 * psi / div["weights"] and mem["gradients"] == 2 * psi / div["gradients"]
        assert mem["optimizer states"] == 12 * psi / div["optimizer states"]
        assert est["micro_batch"] == 2 and est["bubble"] == pytest.approx(1 / 5)
        sbh = 32 * 2 * 64
        assert mem["activations"] == pytest.approx(sbh * (10 + 24 / 2 + 5 * 4 * 32 / (64 * 2)) * 2 * 2)
        ring = 1 / 2  # (k - 1) / k for k = 2
        assert est["comm"]["dp"] == 2 * (2 if zero in (0, 2) else 3) * ring * psi
        assert est["comm"]["tp"] == 2 * 4 * 2 * ring * sbh * 2 * 4  # 4 all-reduces x 2 layers x 4 micro-batches
        assert est["comm"]["pp"] == 2 * 2 * sbh * 4


def test_bad_input_gets_one_clear_line(capsys):
    cases = [(["--gpus", "0"], "--gpus must be at least 1, got 0"),
             (["--gpus", "-2"], "--gpus must be at least 1, got -2"),
             (["--mfu", "0"], "--mfu must be in (0, 1]"), (["--mfu", "1.5"], "--mfu must be in (0, 1]"),
             (["--tokens=-1e9"], "--tokens must be positive"),
             (["--model", "tiny", "--seq-len", "512"], "--seq-len 512 is beyond the context of model 'tiny' (256)"),
             (["--gpus", "8", "--tp", "5"], "--gpus 8 is not a multiple of --tp 5 x --pp 1"),
             (["--gpus", "5", "--tp", "5"], "--tp 5 does not divide the model's n_head 12"),
             (["--gpus", "8", "--tp", "2", "--pp", "2", "--batch-size", "3"], "--batch-size 3 does not divide"),
             (["--model", "tiny", "--gpus", "8", "--pp", "8"], "--pp 8 is more stages than the model's 4 layers"),
             (["--n-head", "7"], "--n-head 7 must divide --d-model 768"),
             (["--params", "-1"], "--params must be positive")]
    for argv, expected in cases:
        for main, prefix in ((estimate.main, []), (pretrain.main, ["--estimate"])):  # pretrain.py forwards
            with pytest.raises(SystemExit) as e:
                main(prefix + argv)
            assert e.value.code == 2
            err = capsys.readouterr().err.strip()
            assert expected in err and "\n" not in err and "Traceback" not in err, (argv, err)
