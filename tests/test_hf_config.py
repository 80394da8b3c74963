"""Hugging Face config.json in both forms (transformers 4: top-level rope_theta and rope_scaling;
transformers 5: rope_parameters), Llama 3.1's rope scaling and a head_dim of its own against
formulas written here, the special token ids, and what export-hf writes for transformers (tied head,
ids, generation_config.json, tokenizer files)."""
import json
import math
import re
from dataclasses import asdict, replace

import pytest
import torch

import data
import hf
import pretrain
import weights
from model import ADDED_FIELDS, PRESETS, ModelConfig, Transformer, config_dict
from tests import test_model_parallel
from tests.test_weights import llama_reference

SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}
COMMON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 32, "vocab_size": 64, "tie_word_embeddings": True,
          "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": [1, 2]}
V4 = COMMON | {"rope_theta": 500000.0, "rope_scaling": dict(SCALING), "torch_dtype": "bfloat16",
               "transformers_version": "4.46.0"}
V5 = COMMON | {"rope_parameters": {"rope_theta": 500000.0} | SCALING, "dtype": "bfloat16",
               "transformers_version": "5.0.0"}
WANT = {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "d_ff": 64, "vocab_size": 64,
        "block_size": 32, "rope_theta": 5e5, "norm_eps": 1e-5, "attn": "-",
        "activation_checkpointing": False, "head_dim_override": 16, "rope_scaling": SCALING}


def llama3_inv_freq(theta, hd, factor, low_freq_factor, high_freq_factor,
                    original_max_position_embeddings):
    """Llama 3.1's scaled frequencies, one by one in plain floats, from the paper's description."""
    out = []
    for i in range(0, hd, 2):
        f = theta ** (-i / hd)
        wavelen = 2 * math.pi / f
        if wavelen < original_max_position_embeddings / high_freq_factor:
            out.append(f)  # fast: many turns in the old context
        elif wavelen > original_max_position_embeddings / low_freq_factor:
            out.append(f / factor)  # slow: stretched by the factor
        else:
            s = ((original_max_position_embeddings / wavelen - low_freq_factor)
                 / (high_freq_factor - low_freq_factor))
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out, dtype=torch.float64)


def tables(inv_freq, T):
    angles = torch.tensor([[p * f for f in inv_freq.tolist()] for p in range(T)],
                          dtype=torch.float64)
    return angles.cos(), angles.sin()


def test_both_forms_give_the_same_model_config():
    assert hf._check_config(V4, "v4") == hf._check_config(V5, "v5") == WANT
    # The form Llama 3.1's own files use ("type" in older ones); the default type with theta 5e5
    # in either form.
    assert hf._check_config(V4 | {"rope_scaling": {"type": "llama3"}
                                  | {k: v for k, v in SCALING.items() if k != "rope_type"}},
                            "v4") == WANT
    plain = {k: v for k, v in WANT.items() if k != "rope_scaling"}
    assert hf._check_config(V5 | {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
                            "v5") == plain
    assert hf._check_config(V4 | {"rope_scaling": None}, "v4") == plain
    assert hf._check_config({k: v for k, v in V4.items()
                             if k not in ("rope_theta", "rope_scaling")},
                            "v4")["rope_theta"] == 1e4  # Llama's default when no form names one


def test_theta_and_llama3_scaling_reach_the_rope_tables():
    model = Transformer(ModelConfig(**hf._check_config(V5, "v5")))
    inv_freq = llama3_inv_freq(5e5, 16, **{k: v for k, v in SCALING.items() if k != "rope_type"})
    L = SCALING["original_max_position_embeddings"]
    wavelen = 2 * math.pi / (5e5 ** (-torch.arange(0, 16, 2) / 16))
    # all three regimes are exercised: unchanged, blended and stretched frequencies
    assert ((wavelen < L / 4).any() and ((wavelen > L / 4) & (wavelen < L)).any()
            and (wavelen > L).any())
    cos, sin = tables(inv_freq, 32)
    torch.testing.assert_close(model.rope_cos.double(), cos, rtol=0, atol=1e-7)
    torch.testing.assert_close(model.rope_sin.double(), sin, rtol=0, atol=1e-7)
    plain = Transformer(ModelConfig(**hf._check_config(
        V5 | {"rope_parameters": {"rope_theta": 5e5}}, "v5")))
    cos, sin = tables(torch.tensor([5e5 ** (-i / 16) for i in range(0, 16, 2)],
                                   dtype=torch.float64), 32)
    torch.testing.assert_close(plain.rope_cos.double(), cos, rtol=0, atol=1e-7)


def hf_folder(path, config, seed=0):
    """A folder as transformers saves it: config.json, random fp64 tensors under Llama's names."""
    cfg = hf._check_config(config, "config.json")
    g = torch.Generator().manual_seed(seed)
    tensors = {hf.rename(n, hf.TO_HF): torch.randn(shape, dtype=torch.float64, generator=g) * 0.3
               for n, shape in hf.expected_shapes(cfg).items()}
    if config.get("tie_word_embeddings"):
        del tensors["lm_head.weight"]
    path.mkdir(parents=True, exist_ok=True)
    hf.write_safetensors(path / "model.safetensors", tensors)
    (path / "config.json").write_text(json.dumps(config | {"tokenizer": "bytes"}))
    return tensors


def test_head_dim_and_llama3_forward_match_an_independent_reference(tmp_path):
    tensors = hf_folder(tmp_path / "hf", V5)
    init = weights.load_weights(tmp_path / "hf")
    model = Transformer(ModelConfig(**init["model_config"] | {"attn": "naive"})).double()
    model.load_state_dict(init["model"])
    # head_dim 16 with d_model 32 and 4 heads
    assert model.blocks[0].attn.wq.weight.shape == (4 * 16, 32)
    idx = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(1))
    inv_freq = llama3_inv_freq(5e5, 16, **{k: v for k, v in SCALING.items() if k != "rope_type"})
    ref = llama_reference(tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"]},
                          V5, idx, inv_freq)
    # float64 but for model.py's RoPE tables, kept in fp32: 1e-6.
    torch.testing.assert_close(model(idx)[0], ref, rtol=1e-6, atol=1e-6)


def test_tensor_parallel_with_head_dim_and_llama3_matches_one_process():
    """tp 2 splits the heads of width 16 (not d_model / n_head = 8): three AdamW steps, in float64,
    as one process's."""
    cfg = replace(test_model_parallel.CFG, head_dim_override=16, rope_scaling=SCALING)
    test_model_parallel.check_against_one_process([(2, 1, "1f1b", 0, False)], 2, cfg)


@pytest.mark.parametrize("change, expected", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_type 'yarn' cannot be"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling rope_type 'linear' cannot be represented"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_type 'dynamic' cannot be represented"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "default"}}},
     "rotary settings per layer type"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2]}},
     "'mrope_section'"),
    ({"rope_parameters": {k: v for k, v in SCALING.items() if k != "high_freq_factor"}},
     "needs numbers factor"),
    ({"rope_parameters": SCALING | {"low_freq_factor": 4.0}},
     "0 < low_freq_factor < high_freq_factor"),
    ({"rope_parameters": {"rope_theta": "big"}}, "rope_theta 'big' is not a number"),
    ({"rope_theta": 1e4}, "rope_parameters says (500000.0, {'rope_type': 'llama3'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 cannot be represented"),
    ({"head_dim": 7}, "head_dim 7 with 4 heads and 2 KV heads: model.py needs an even head_dim"),
    ({"num_key_value_heads": 3}, "grouped evenly over the KV heads"),
    ({"mlp_bias": True}, "mlp_bias True cannot be represented"),
])
def test_what_model_py_cannot_represent_is_one_line(change, expected):
    with pytest.raises(hf.HFError) as e:
        hf._check_config(V5 | change, "hf/config.json")
    assert (expected in str(e.value) and str(e.value).startswith("hf/config.json: ")
            and "\n" not in str(e.value))


def test_a_tied_head_that_differs_is_refused(tmp_path):
    tensors = hf_folder(tmp_path / "hf", V5)
    hf.write_safetensors(tmp_path / "hf" / "model.safetensors",
                         tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"] + 1})
    with pytest.raises(hf.HFError, match="tie_word_embeddings is true, but lm_head.weight differs"):
        weights.load_weights(tmp_path / "hf")


def test_a_model_config_recorded_before_the_new_fields_reads_the_same(tmp_path):
    old = {k: v for k, v in asdict(PRESETS["tiny"]).items()
           if k not in ADDED_FIELDS} | {"attn": "-"}
    assert ModelConfig(**old) == ModelConfig(**asdict(PRESETS["tiny"]) | {"attn": "-"})
    assert config_dict(ModelConfig(**old)) == old == config_dict(old | ADDED_FIELDS)
    model = Transformer(ModelConfig(**old))
    # a consolidated file of either vintage reads back as `old`
    for i, cfg in enumerate((old, old | ADDED_FIELDS)):
        torch.save({"model": model.state_dict(), "model_config": cfg, "tokenizer": "bytes"},
                   tmp_path / f"{i}.pt")
        assert weights.load_weights(tmp_path / f"{i}.pt")["model_config"] == old


def test_checkpoints_record_the_old_keys_and_resume(tmp_path, stdlib_data):
    flags = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "1",
             "--eval-iters", "1", "--sample-tokens", "0", "--max-steps", "2", "--out",
             str(tmp_path / "run")]
    assert pretrain.main(flags + ["--stop-after", "1"])["step"] == 1
    meta = json.loads((tmp_path / "run" / "step_000001" / "meta.json").read_text())
    assert not set(ADDED_FIELDS) & (set(meta["model_config"])
                                    | set(meta["identity"]["model_config"]))
    assert pretrain.main(flags + ["--resume"])["step"] == 2


def tokenizer_files(folder):
    """A Hugging Face tokenizer's files, by hand: special tokens in tokenizer.json's added_tokens,
    named by tokenizer_config.json (a string or an AddedToken object)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": [
        {"id": 60, "content": "<s>", "special": True},
        {"id": 61, "content": "</s>", "special": True}],
        "model": {"type": "BPE", "vocab": {}, "merges": []}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                              "eos_token": {"content": "</s>"}}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}"
                                                "{{ m['content'] }}{% endfor %}")


def test_special_ids_come_from_generation_config_then_config_then_the_tokenizer(tmp_path):
    tokenizer_files(tmp_path / "tok")
    assert hf.special_ids(str(tmp_path / "tok")) == {"bos": 60, "eos": 61, "pad": None}
    assert hf.special_ids("bytes") == {"bos": None, "eos": 256, "pad": None}
    with pytest.raises(hf.CheckpointError,
                       match="is not a folder with tokenizer.json or tokenizer.model"):
        hf.special_ids(str(tmp_path / "moved"))  # a run's tokenizer folder that is gone
    hf_folder(tmp_path / "hf", V5 | {"pad_token_id": 5})
    tokenizer_files(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    init = weights.load_weights(tmp_path / "hf")
    assert init["special_ids"] == {"bos": 0, "eos": 9, "pad": 5}
    assert init["tokenizer"] == str((tmp_path / "hf").resolve())  # the folder is its own tokenizer
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(hf.HFError, match="eos_token_id '</s>' is not a token id or a list of them"):
        weights.load_weights(tmp_path / "hf")


def test_export_writes_the_tied_head_ids_and_tokenizer_for_transformers(tmp_path):
    tensors = hf_folder(tmp_path / "hf", V5)
    tokenizer_files(tmp_path / "hf")
    init = weights.load_weights(tmp_path / "hf")  # tied: the head is a copy of the embedding
    # Saved the way a run on that tokenizer records its consolidated file.
    torch.save(init, tmp_path / "model.pt")
    config = hf.export_hf(tmp_path / "model.pt", tmp_path / "out")
    out = tmp_path / "out"
    assert "lm_head.weight" not in hf.read_safetensors(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text()) == config and "tokenizer" not in config
    assert {"tie_word_embeddings": True, "head_dim": 16, "rope_theta": 5e5, "rope_scaling": SCALING,
            "rope_parameters": SCALING | {"rope_theta": 5e5}, "bos_token_id": 0,
            "eos_token_id": [1, 2], "pad_token_id": None}.items() <= config.items()
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 0, "eos_token_id": [1, 2], "pad_token_id": None}
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / f).read_bytes() == (tmp_path / "hf" / f).read_bytes()
    # Read back: both forms of the rope settings are in config.json, and they agree.
    again = weights.load_weights(out)
    assert (again["model_config"] == init["model_config"] == WANT
            and again["tokenizer"] == str(out.resolve()))
    assert all(torch.equal(again["model"][k], v) for k, v in init["model"].items())
    idx = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(1))
    inv_freq = llama3_inv_freq(5e5, 16, **{k: v for k, v in SCALING.items() if k != "rope_type"})
    model = Transformer(ModelConfig(**again["model_config"] | {"attn": "naive"})).double()
    model.load_state_dict(again["model"])
    ref = llama_reference(tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"]},
                          config, idx, inv_freq)
    torch.testing.assert_close(model(idx)[0], ref, rtol=1e-6, atol=1e-6)


def test_export_of_a_byte_level_run_names_its_tokenizer_and_end_of_text(tmp_path):
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])  # untied: the head is written
    torch.save({"model": model.state_dict(), "model_config": config_dict(PRESETS["tiny"]),
                "tokenizer": "bytes"}, tmp_path / "model.pt")
    config = hf.export_hf(tmp_path / "model.pt", tmp_path / "out")
    assert {"tokenizer": "bytes", "bos_token_id": None, "eos_token_id": 256,
            "tie_word_embeddings": False, "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}
            }.items() <= config.items()
    assert "lm_head.weight" in hf.read_safetensors(tmp_path / "out" / "model.safetensors")
    assert (json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"]
            == 256)


def test_a_tiktoken_run_exports_offline_with_tiktokens_own_end_of_text(tmp_path, monkeypatch):
    """A run trained with --tokenizer gpt2 exports on a machine that cannot download gpt2's ranks:
    the end-of-text ids are tiktoken's own (read here from tiktoken's source, not from hf.py)."""
    import tiktoken_ext.openai_public as openai_public
    source = open(openai_public.__file__).read()
    for name, eot in hf.TIKTOKEN_EOT.items():
        body = source.split(f"def {name}():")[1].split("\ndef ")[0]
        ids = re.findall(r'(?:ENDOFTEXT|"<\|endoftext\|>"): (\d+)', body)
        if name == "o200k_harmony":  # (its special tokens start from o200k_base's)
            ids = ids or re.findall(r"ENDOFTEXT: (\d+)",
                                    source.split("def o200k_base():")[1].split("\ndef ")[0])
        assert ids and int(ids[-1]) == eot, (name, ids, eot)

    def offline(name):
        raise data.DataError(f"--tokenizer {name!r} could not be loaded (no network)")
    monkeypatch.setattr(data, "get_tokenizer", offline)
    torch.manual_seed(0)
    cfg = replace(PRESETS["tiny"], vocab_size=50304)
    torch.save({"model": Transformer(cfg).state_dict(), "model_config": config_dict(cfg),
                "tokenizer": "gpt2"}, tmp_path / "model.pt")
    config = hf.export_hf(tmp_path / "model.pt", tmp_path / "out")
    assert config["eos_token_id"] == 50256 and config["tokenizer"] == "gpt2"
