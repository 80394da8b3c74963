"""Hugging Face Llama format: export -> import gives the same logits bit for bit (float64),
config.json carries every field a Llama loader reads, and what model.py cannot represent is refused
in one line naming it."""
import json
import struct
from dataclasses import asdict, replace

import pytest
import torch

import checkpoint
import hf
import weights
from model import PRESETS, Transformer

CFG = replace(PRESETS["tiny"], n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=64,
              block_size=16, rope_theta=5e5, norm_eps=1e-6)


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = Transformer(CFG).double()
    # Norms too: a swapped name or a transposed weight must show in the logits.
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    torch.save({"model": model.state_dict(), "model_config": asdict(replace(CFG, attn="-")),
                "tokenizer": "bytes"}, tmp_path / "model.pt")
    hf.export_hf(tmp_path / "model.pt", tmp_path / "hf")
    return model, tmp_path / "hf"


def test_export_then_import_gives_the_same_logits(exported):
    model, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert config | {"torch_dtype": "float64"} == config and {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-6, "rope_theta": 5e5,
        "max_position_embeddings": 16, "vocab_size": 64, "tie_word_embeddings": False,
        "hidden_act": "silu", "rope_scaling": None}.items() <= config.items()
    init = weights.load_weights(folder)  # what --init HF_DIR reads
    sd, cfg, tokenizer = init["model"], init["model_config"], init["tokenizer"]
    again = Transformer(replace(CFG, **{k: v for k, v in cfg.items() if k != "attn"})).double()
    again.load_state_dict(sd)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(idx)[0], again(idx)[0]) and tokenizer == "bytes"


def llama_reference(t, c, idx, inv_freq=None):
    """Hugging Face's LlamaForCausalLM forward written from its definition, on the exported tensors
    and config alone (float64): an independent check of the name mapping (gate = w1, up = w3,
    down = w2) and of RoPE. `inv_freq`: a scaled RoPE's frequencies (default theta^(-2i/d))."""
    norm = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)  # noqa: E731
                                        + c["rms_norm_eps"]) * w
    H, KV, hd, T = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], idx.shape[1]
    if inv_freq is None:
        inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    emb = torch.cat([torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)] * 2, dim=-1)
    rotate_half = lambda x: torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)  # noqa: E731
    rope = lambda x: x * emb.cos() + rotate_half(x) * emb.sin()  # noqa: E731
    x = t["model.embed_tokens.weight"][idx]
    for i in range(c["num_hidden_layers"]):
        w = lambda n: t[f"model.layers.{i}.{n}.weight"]  # noqa: E731
        h = norm(x, w("input_layernorm"))
        q, k, v = (h @ w(f"self_attn.{p}_proj").T for p in "qkv")
        q = rope(q.view(1, T, H, hd).transpose(1, 2))
        k = rope(k.view(1, T, KV, hd).transpose(1, 2)).repeat_interleave(H // KV, dim=1)
        v = v.view(1, T, KV, hd).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        s = (q @ k.transpose(-1, -2)) / hd ** 0.5 + torch.full((T, T), float("-inf")).triu(1)
        x = x + (s.softmax(-1) @ v).transpose(1, 2).reshape(1, T, H * hd) @ w("self_attn.o_proj").T
        h = norm(x, w("post_attention_layernorm"))
        gate, up = h @ w("mlp.gate_proj").T, h @ w("mlp.up_proj").T
        x = x + (torch.nn.functional.silu(gate) * up) @ w("mlp.down_proj").T
    return norm(x, t["model.norm.weight"]) @ t["lm_head.weight"].T


def test_the_exported_tensors_are_a_llama(exported):
    model, folder = exported
    idx = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(2))
    ref = llama_reference(hf.read_safetensors(folder / "model.safetensors"),
                          json.loads((folder / "config.json").read_text()), idx)
    # float64 but for model.py's RoPE tables, kept in fp32 (|logits| up to 1.7, measured 2e-8
    # apart), hence a tolerance of 1e-6.
    torch.testing.assert_close(model(idx)[0], ref, rtol=1e-6, atol=1e-6)


def test_tied_embeddings_are_copied_into_the_head(exported):
    model, folder = exported
    tensors = hf.read_safetensors(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    hf.write_safetensors(folder / "model.safetensors", tensors)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    sd = hf.import_hf(folder)["model"]
    assert torch.equal(sd["lm_head.weight"], model.tok_emb.weight)


def refused(folder, config=None, tensors=None, raw=None):
    if config:
        c = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(c | config))
    if tensors:
        t = hf.read_safetensors(folder / "model.safetensors")
        hf.write_safetensors(folder / "model.safetensors", tensors(t))
    if raw:
        (folder / "model.safetensors").write_bytes(raw((folder / "model.safetensors").read_bytes()))
    with pytest.raises(checkpoint.CheckpointError) as e:
        weights.load_weights(folder)
    assert "\n" not in str(e.value)
    return str(e.value)


def header(change):
    """raw= for refused(): the safetensors header edited by change(header); tensor bytes kept."""
    def raw(b):
        n = struct.unpack("<Q", b[:8])[0]
        h = json.loads(b[8:8 + n])
        change(h)
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + b[8 + n:]
    return raw


# The norm's bytes claimed by a 1-D tensor of the same size, placed over the embedding's.
def _overlap(h):
    h["model.norm.weight"]["data_offsets"] = [0, h["model.norm.weight"]["data_offsets"][1]
                                              - h["model.norm.weight"]["data_offsets"][0]]


@pytest.mark.parametrize("case, expected", [
    (dict(raw=header(_overlap)),
     "tensors model.norm.weight and model.embed_tokens.weight overlap in the file"),
    (dict(raw=header(lambda h: h["model.norm.weight"].update(shape=[32.0]))),
     "corrupt safetensors header entry for model.norm.weight"),
    (dict(raw=header(lambda h: h["model.norm.weight"].update(shape=[-32]))),
     "must be non-negative integers"),
    (dict(raw=header(lambda h: h["model.norm.weight"].update(shape=[2 ** 70, 2 ** 70]))),
     "that fit the file"),
    (dict(config={"num_hidden_layers": 10 ** 9}),
     "num_hidden_layers 1000000000, but its safetensors files hold the tensors of 2 layers"),
    (dict(config={"num_hidden_layers": 1e9}),
     "num_hidden_layers 1000000000.0 must be a positive integer"),
    (dict(config={"num_attention_heads": 0}), "num_attention_heads 0 must be a positive integer"),
    (dict(config={"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}),
     "is not LlamaForCausalLM"),
    (dict(config={"hidden_act": "gelu"}), "hidden_act 'gelu' cannot be represented"),
    (dict(config={"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
     "rope_scaling of rope_type 'llama3' needs"),
    (dict(config={"attention_bias": True}), "attention_bias True"),
    (dict(tensors=lambda t: t | {"model.layers.0.self_attn.q_proj.bias":
                                 torch.zeros(32, dtype=torch.float64)}),
     "model.layers.0.self_attn.q_proj.bias is a bias"),
    # LayerNorm, not RMSNorm
    (dict(tensors=lambda t: t | {"model.norm.bias": torch.zeros(32, dtype=torch.float64)}),
     "model.norm.bias is a bias"),
    (dict(config={"intermediate_size": 96}),
     "model.layers.0.mlp.gate_proj.weight has shape [64, 32], config.json implies [96, 32]"),
    (dict(tensors=lambda t: {k: v for k, v in t.items() if "o_proj" not in k}),
     "self_attn.o_proj.weight is missing"),
    (dict(raw=lambda b: struct.pack("<Q", 10 ** 9) + b[8:]),
     "corrupt safetensors header (header length"),
    (dict(raw=lambda b: b[:8] + b"!" + b[9:]), "corrupt safetensors header (not a JSON object)"),
    (dict(raw=lambda b: b[:-100]), "corrupt safetensors header entry for"),
])
def test_what_model_py_cannot_represent_is_one_line(exported, case, expected):
    assert expected in refused(exported[1], **case)
