import copy

import pytest
import torch

import lora
from model import Transformer
from sft_fixtures import CFG

ALL = lora.TARGETS


def base_and_batch(seed=0):
    torch.manual_seed(seed)
    model = Transformer(CFG).double()
    idx = torch.randint(0, 257, (3, 33))
    return model, idx[:, :-1], idx[:, 1:]


def trained_adapted(model, x, y, targets=ALL, steps=5):
    adapted = copy.deepcopy(model)
    lora.apply_lora(adapted, r=4, alpha=8, targets=targets)
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        adapted(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    return adapted


def test_step_zero_is_the_base_model():
    """B = 0: the adapted model's logits equal the base's exactly (float64), dropout active too."""
    model, x, _ = base_and_batch()
    adapted = copy.deepcopy(model)
    lora.apply_lora(adapted, r=4, alpha=8, dropout=0.1, targets=ALL)
    assert torch.equal(adapted(x)[0], model(x)[0])
    # A is random, not zero
    assert all(m.lora_A.abs().sum() > 0 for _, m in lora.lora_layers(adapted))


def test_seed_draws_other_adapters():
    """--seed reaches A: another seed, other values; the same seed, the same; each layer its own."""
    model, _, _ = base_and_batch()
    drawn = {}
    for seed in (0, 1, 0):
        adapted = copy.deepcopy(model)
        lora.apply_lora(adapted, r=4, alpha=8, targets=ALL, seed=seed)
        drawn.setdefault(seed, []).append([m.lora_A.clone() for _, m in lora.lora_layers(adapted)])
    (a0, a0_again), (a1,) = drawn[0], drawn[1]
    assert all(torch.equal(p, q) for p, q in zip(a0, a0_again))
    assert not any(torch.equal(p, q) for p, q in zip(a0, a1))
    assert not torch.equal(a0[0], a0[1])


def test_trainable_parameters_are_r_times_d_in_plus_d_out(capsys):
    model, _, _ = base_and_batch()
    lora.apply_lora(model, r=4, alpha=8, targets=("wq", "wk", "w2"))
    d, kv, ff = CFG.d_model, CFG.n_kv_head * CFG.head_dim, CFG.d_ff
    per_block = 4 * (d + d) + 4 * (d + kv) + 4 * (ff + d)  # wq: d -> d, wk: d -> kv, w2: d_ff -> d
    trainable, total, expected = lora.count_trainable(model)
    assert trainable == expected == CFG.n_layer * per_block
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names == sorted(f"blocks.{i}.{m}.lora_{ab}" for i in range(CFG.n_layer)
                           for m in ("attn.wq", "attn.wk", "mlp.w2") for ab in "AB")
    assert f"{trainable:,} trainable of {total:,}" in lora.describe(model)


def test_merged_weights_reproduce_the_adapted_model():
    """After training the adapters, W + (alpha/r) B A gives the adapted logits (float64: to
    rounding) in a plain model with the base's state-dict keys."""
    model, x, y = base_and_batch()
    adapted = trained_adapted(model, x, y)
    # the adapters did learn something
    assert not torch.allclose(adapted(x)[0], model(x)[0], atol=1e-3)
    expected = adapted(x)[0]
    merged_sd = lora.merged_state_dict(adapted)  # without touching the adapted model
    assert lora.lora_layers(adapted) and merged_sd.keys() == model.state_dict().keys()
    merged = lora.merge_lora(adapted)
    for k, v in merged.state_dict().items():
        assert torch.equal(merged_sd[k], v), k
    assert not lora.lora_layers(merged) and merged.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(merged(x)[0], expected, rtol=0, atol=1e-12)


def test_base_is_frozen_and_adapters_save_and_load(tmp_path):
    model, x, y = base_and_batch()
    adapted = trained_adapted(model, x, y, targets=("wv", "w1"))
    for k, v in model.state_dict().items():  # every base weight unchanged by training
        assert torch.equal(adapted.state_dict()[k], v), k
    lora.save_adapter(tmp_path / "a.pt", adapted, {"cfg": 1})
    saved = torch.load(tmp_path / "a.pt", weights_only=False)["adapter"]
    assert all(".lora_" in k for k in saved) and len(saved) == 2 * 2 * CFG.n_layer
    fresh = lora.load_adapter(copy.deepcopy(model), tmp_path / "a.pt", {"cfg": 1})
    assert torch.equal(fresh(x)[0], adapted(x)[0])
    with pytest.raises(lora.LoRAError, match="another model config"):
        lora.load_adapter(copy.deepcopy(model), tmp_path / "a.pt", {"cfg": 2})


def test_optimizer_state_holds_only_the_adapters():
    """AdamW keeps exp_avg and exp_avg_sq (fp32, 8 bytes) per trainable parameter plus a 4-byte step
    per tensor: measured after real steps, for full fine-tuning and for LoRA."""
    model, x, y = base_and_batch()
    model = model.float()
    measured = {}
    for name in ("full", "lora"):
        m = copy.deepcopy(model)
        if name == "lora":
            lora.apply_lora(m, r=4, alpha=8, targets=ALL)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        m(x, y)[1].backward()
        opt.step()
        measured[name] = lora.optimizer_state_bytes(opt)
        assert measured[name] == 8 * sum(p.numel() for p in params) + 4 * len(params)
    assert measured["lora"] < measured["full"] / 5
