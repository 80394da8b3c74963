"""Every attention call the model makes is one a flash kernel serves on CUDA, so that no layer falls
to SDPA's math backend and its T x T fp32 scores; and --amp's default is bf16 on CUDA (the flash
kernel is 16-bit only).

A CPU's flash SDPA takes any dtype and masks, so the CPU alone cannot show a call CUDA would refuse:
the test's SDPA holds every call to the CUDA flash kernel's conditions (fp16/bf16, no attn_mask;
grouped-query attention through enable_gqa) before running it under sdpa_kernel([FLASH_ATTENTION]),
which raises "No available kernel" where no flash kernel fits (on CUDA, the real check)."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flags
import model as model_lib
import pretrain
from model import PRESETS, Transformer

# head_dim 16: the smallest flash_attn.py takes
CFG = replace(PRESETS["tiny"], n_layer=2, d_model=64, n_head=4, n_kv_head=4, d_ff=96, block_size=32)
REAL_SDPA = F.scaled_dot_product_attention


def flash_only_sdpa(calls):
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("No available kernel: CUDA's flash SDPA takes no attn_mask and "
                               f"16-bit inputs only (got {q.dtype}, mask {attn_mask is not None})")
        calls.append("sdpa-flash")
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return REAL_SDPA(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return sdpa


def packed_inputs(B=2, T=32):
    """Rows of three packed examples: positions restart at every example, doc ids number them."""
    lengths = [10, 12, 10]
    pos = torch.cat([torch.arange(n) for n in lengths]).repeat(B, 1)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).repeat(B, 1)
    return {"pos": pos, "doc": doc}


@pytest.mark.parametrize("n_kv_head,packed", [(4, False), (2, False), (4, True), (2, True)],
                         ids=["causal", "gqa", "packed", "packed-gqa"])
def test_every_attention_call_is_served_by_a_flash_kernel_in_bf16(monkeypatch, n_kv_head, packed):
    cfg = replace(CFG, n_kv_head=n_kv_head)
    torch.manual_seed(0)
    ref = Transformer(cfg).double()
    model = Transformer(cfg).to(torch.bfloat16)
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    extra = packed_inputs() if packed else {}
    calls = []
    monkeypatch.setattr(model_lib.F, "scaled_dot_product_attention", flash_only_sdpa(calls))
    import flash_attn
    real_flash = flash_attn.flash_attention
    monkeypatch.setattr(flash_attn, "flash_attention",
                        lambda *a, **kw: calls.append("flash_attn doc") or real_flash(*a, **kw))
    _, loss = model(idx, idx, **extra)
    loss.backward()
    assert calls == [("flash_attn doc" if packed else "sdpa-flash")] * cfg.n_layer
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # In float64 on the plain path (masked SDPA on the CPU): the same loss, bf16's rounding apart.
    monkeypatch.setattr(model_lib.F, "scaled_dot_product_attention", REAL_SDPA)
    _, ref_loss = ref(idx, idx, **extra)
    assert abs(loss.double().item() - ref_loss.item()) < 0.02 * ref_loss.item()


def test_packed_rows_in_bf16_match_the_masked_path():
    """The document path and the block-diagonal mask agree (bf16 inputs, fp32 inside both)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 32, 16).to(torch.bfloat16) for h in (4, 2, 2))
    doc = packed_inputs()["doc"]
    got = model_lib.sdpa_attention(q, k, v, doc)
    want = REAL_SDPA(q.double(), k.double(), v.double(), attn_mask=model_lib.packed_mask(doc),
                     enable_gqa=True)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-2)


@pytest.mark.parametrize("cuda,expected", [(True, "bf16"), (False, "fp32")])
def test_amp_auto_is_bf16_on_cuda_and_fp32_on_a_cpu(monkeypatch, tmp_path, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = pretrain.parse(["--out", str(tmp_path / "run"), "--batch-size", "4"])
    assert cfg.settings.amp == "auto"
    flags.check_args(cfg, 1)
    # resolved before the run's identity (training.SAME_RUN) is recorded; the parsed one unchanged
    assert flags.resolved(cfg).settings.amp == expected and cfg.settings.amp == "auto"
