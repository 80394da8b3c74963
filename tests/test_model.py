from dataclasses import replace

import pytest
import torch

from model import PRESETS, Transformer, flops_per_token, num_params

CFG = replace(PRESETS["tiny"], n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, block_size=32)


def build(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).double()


def set_backend(model, backend):
    for b in model.blocks:
        b.attn.backend = backend


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_naive_and_sdpa_agree_in_float64(n_kv_head):
    model = build(replace(CFG, n_kv_head=n_kv_head))
    idx = torch.randint(0, CFG.vocab_size, (3, 32))
    out = {}
    for backend in ("naive", "sdpa"):
        set_backend(model, backend)
        logits, loss = model(idx, idx)
        loss.backward()
        out[backend] = (logits, [p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    # Same arithmetic up to summation order in float64: agreement to ~1e-12 is the expectation.
    torch.testing.assert_close(out["naive"][0], out["sdpa"][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(out["naive"][1], out["sdpa"][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_causal_future_tokens_do_not_change_the_past():
    model = build()
    idx = torch.randint(0, CFG.vocab_size, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % CFG.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-12)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_activation_checkpointing_gives_the_same_gradients():
    idx = torch.randint(0, CFG.vocab_size, (2, 32))
    grads = []
    for ckpt in (False, True):
        model = build(replace(CFG, activation_checkpointing=ckpt))
        _, loss = model(idx, idx)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_ignored_labels_get_no_loss():
    model = build()
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    targets = idx.clone()
    targets[:, :8] = -100
    _, masked = model(idx, targets)
    logits, _ = model(idx)
    ref = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, CFG.vocab_size),
                                            idx[:, 8:].reshape(-1))
    torch.testing.assert_close(masked, ref)


def test_parameter_count_matches_the_closed_form():
    cfg = PRESETS["gpt2-124m"]
    with torch.device("meta"):
        model = Transformer(cfg)
    d, hd, L, V = cfg.d_model, cfg.head_dim, cfg.n_layer, cfg.vocab_size
    per_layer = d * cfg.n_head * hd * 2 + d * cfg.n_kv_head * hd * 2 + 3 * d * cfg.d_ff + 2 * d
    assert num_params(model) == 2 * V * d + L * per_layer + d
    assert num_params(model, matmul_only=True) == num_params(model) - V * d
    assert flops_per_token(cfg, 100, 10) == 600 + 6 * L * d * 10  # causal: half the T x T scores


def test_generate_is_greedy_at_temperature_zero():
    model = build()
    prompt = torch.randint(0, CFG.vocab_size, (2, 5))
    out = model.generate(prompt, 40, temperature=0)  # longer than block_size: the context slides
    assert out.shape == (2, 45) and torch.equal(out[:, :5], prompt)
    logits, _ = model(out[:, -CFG.block_size - 1:-1])
    assert torch.equal(logits[:, -1].argmax(-1), out[:, -1])
