"""chat.py: a model folder's Jinja chat template renders the conversation, its special tokens encode
as their ids, and exactly the assistant turns (content and end token) are learned; sft.py fine-tunes
a Hugging Face folder with it end to end. The expected texts are written by hand, not rendered."""
import json

import pytest
import torch

import chat
import data
import sft
import sft_data
import hf
from model import ModelConfig, Transformer
from sft_fixtures import reverse_examples, write_jsonl
from test_bpe import smollm_style, write_folder

# ChatML, as SmolLM2-Instruct and Qwen2 write it: a default system turn when none is given.
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 3's layout: BOS, headers, <|eot_id|>; {% generation %} marks; an unknown role is an error.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}"
          "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
          "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
          "{% if m['role'] == 'assistant' %}"
          "{% generation %}{{ m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
          "{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Hello!"}]


def folder_enc(tmp_path, template, eos="<|im_end|>",
               specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), **cfg):
    tj = smollm_style()
    tj["added_tokens"] = [{"id": i, "content": t, "special": True} for i, t in enumerate(specials)]
    tj["model"]["vocab"] = {**{t: i for i, t in enumerate(specials)},
                            **{t: i + len(specials) - 3 for t, i in tj["model"]["vocab"].items()
                               if i >= 3}}
    folder = write_folder(tmp_path / f"tok{len(list(tmp_path.iterdir()))}", tj,
                          tokenizer_config={"eos_token": eos, "chat_template": template, **cfg})
    return data.get_tokenizer(str(folder)), folder


def learned_text(enc, ids, learned):
    """The learned runs, decoded: one string per run."""
    runs, cur = [], []
    for t, l in zip(ids + [None], learned + [False]):
        if l:
            cur.append(t)
        elif cur:
            runs.append(enc.decode(cur))
            cur = []
    return runs


def test_chatml_template_learns_only_the_assistant_turns(tmp_path):
    enc, _ = folder_enc(tmp_path, CHATML)
    ids, learned = chat.encode(enc, CHAT)
    assert enc.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                               "<|im_start|>user\nHi<|im_end|>\n"
                               "<|im_start|>assistant\nHello<|im_end|>\n"
                               "<|im_start|>user\nAgain<|im_end|>\n"
                               "<|im_start|>assistant\nHello!<|im_end|>\n")
    # The special tokens are their ids, not their characters spelled in bytes.
    im_start = enc.encode_single_token("<|im_start|>")
    im_end = enc.encode_single_token("<|im_end|>")
    assert ids.count(im_start) == 5 and ids.count(im_end) == 5 and len(ids) == len(learned)
    assert learned_text(enc, ids, learned) == ["Hello<|im_end|>", "Hello!<|im_end|>"]
    assert ids[[i for i, l in enumerate(learned) if l][-1]] == im_end
    prompt = chat.prompt_ids(enc, CHAT)
    assert enc.decode(prompt).endswith("<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n")
    assert prompt == ids[:len(prompt)]  # generation starts from exactly the tokens training saw
    # A default system turn when none is given; the stop ids hold the end of a turn.
    ids, _ = chat.encode(enc, CHAT[1:3])
    assert enc.decode(ids).startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n"
                                      "<|im_start|>user\nHi")
    assert im_end in chat.stop_ids(enc)


def test_base_model_eos_still_stops_at_the_turns_end(tmp_path):
    """A base model's eos (<|endoftext|>) is not ChatML's turn end: <|im_end|> stops a reply too."""
    enc, _ = folder_enc(tmp_path, CHATML, eos="<|endoftext|>")
    assert data.eot_id(enc) == enc.encode_single_token("<|endoftext|>")
    assert chat.stop_ids(enc) == {enc.encode_single_token("<|endoftext|>"),
                                  enc.encode_single_token("<|im_end|>")}


def test_llama3_layout_with_bos_generation_marks_and_raise_exception(tmp_path):
    specials = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>")
    enc, _ = folder_enc(tmp_path, LLAMA3, eos="<|eot_id|>", specials=specials,
                        bos_token="<|begin_of_text|>")
    ids, learned = chat.encode(enc, CHAT[1:])
    assert enc.decode(ids) == ("<|begin_of_text|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nAgain<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    assert ids[0] == enc.encode_single_token("<|begin_of_text|>")
    assert learned_text(enc, ids, learned) == ["Hello<|eot_id|>", "Hello!<|eot_id|>"]
    with pytest.raises(data.DataError, match="chat template failed: unknown role tool"):
        chat.prompt_ids(enc, [{"role": "tool", "content": "x"},
                              {"role": "assistant", "content": "y"}])


def test_template_list_and_jinja_file(tmp_path):
    enc, folder = folder_enc(tmp_path, [{"name": "tool_use", "template": "x"},
                                        {"name": "default", "template": CHATML}])
    assert enc.chat_template == CHATML
    (folder / "chat_template.jinja").write_text(LLAMA3)
    data.bpe.load_folder.cache_clear()
    assert data.get_tokenizer(str(folder)).chat_template == LLAMA3


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """Learned spans come from rendering prefixes: a template that renders a turn differently once
    more follow (here only the last assistant turn keeps its text) is refused in one line."""
    enc, _ = folder_enc(tmp_path, "{% for m in messages %}{{ m['role'] }}: "
                                  "{{ m['content'] if loop.last else '...' }}<|im_end|>"
                                  "{% endfor %}")
    lines = [{"messages": CHAT}]
    examples = chat.read_jsonl(write_jsonl(tmp_path / "t.jsonl", lines))
    with pytest.raises(data.DataError) as e:
        sft_data.tokenize(examples, enc, 128)
    assert str(e.value).startswith(f"{tmp_path / 't.jsonl'}:1: the tokenizer's chat template "
                                   "renders message 3 differently") and "\n" not in str(e.value)


# ------------------------------------------------------------------------------- sft.py, end to end
def hf_folder(tmp_path, vocab_size):
    """A Llama folder as Hugging Face writes one: config.json, model.safetensors (a tiny random
    model.py model under Llama's names), tokenizer.json (SmolLM style) and tokenizer_config.json
    with a ChatML template."""
    enc, folder = folder_enc(tmp_path, CHATML)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, vocab_size=vocab_size,
                      block_size=128)
    torch.manual_seed(0)
    sd = Transformer(cfg).state_dict()
    hf_names = {hf.rename(k, hf.TO_HF): v for k, v in sd.items()}
    hf.write_safetensors(folder / "model.safetensors", hf_names)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": vocab_size, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tokenizer": str(folder)}))
    return enc, folder


def test_sft_fine_tunes_a_hugging_face_folder_with_its_template(tmp_path):
    enc, folder = hf_folder(tmp_path, vocab_size=704)
    assert enc.n_vocab <= 704
    train = write_jsonl(tmp_path / "train.jsonl", reverse_examples(16))
    val = write_jsonl(tmp_path / "val.jsonl", reverse_examples(4, seed=1))
    # The labels: exactly each example's reply and its <|im_end|>.
    rows, _ = sft_data.tokenize(chat.read_jsonl(train), enc, 128)
    im_end = enc.encode_single_token("<|im_end|>")
    for (x, y), line in zip(rows, reverse_examples(16)):
        reply = line["output"] if "output" in line else line["messages"][-1]["content"]
        assert [t for t in y if t != -100] == enc.encode(reply) + [im_end]
    res = sft.main(["--init", str(folder), "--data", str(train), "--val-data", str(val),
                    "--out", str(tmp_path / "o"), "--max-steps", "2", "--batch-size", "4",
                    "--lora-r", "4", "--lr", "3e-3", "--warmup-steps", "1", "--samples", "1",
                    "--max-new-tokens", "4"])
    assert len(res["losses"]) == 2 and all(torch.isfinite(torch.tensor(res["losses"])))
    assert len(res["samples"]) == 1 and (tmp_path / "o" / "merged.pt").exists()
    assert torch.load(tmp_path / "o" / "merged.pt", weights_only=False)["tokenizer"] == str(folder)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, capsys):
    enc, folder = hf_folder(tmp_path, vocab_size=64)
    train = write_jsonl(tmp_path / "train.jsonl", reverse_examples(8))
    with pytest.raises(SystemExit) as e:
        sft.main(["--init", str(folder), "--data", str(train), "--out", str(tmp_path / "o"),
                  "--max-steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (f"its tokenizer has {enc.n_vocab} ids, more than the model's vocab_size 64" in err
            and err.count("\n") == 1)


def test_an_unreadable_tokenizer_stops_sft_in_one_line(tmp_path, capsys):
    _, folder = hf_folder(tmp_path, vocab_size=704)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["model"]["type"] = "Unigram"
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    data.bpe.load_folder.cache_clear()  # (read once per process, by path)
    train = write_jsonl(tmp_path / "train.jsonl", reverse_examples(8))
    with pytest.raises(SystemExit) as e:
        sft.main(["--init", str(folder), "--data", str(train), "--out", str(tmp_path / "o"),
                  "--max-steps", "1", "--batch-size", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and not (tmp_path / "o").exists()
    assert (f"{folder.resolve() / 'tokenizer.json'}: model type Unigram is not read "
            "(only byte-level BPE)") in err
