"""A pretrained model's Hugging Face folder end to end: LoRA fine-tuning on tp 2 x ZeRO-3 (4 ranks)
equal to one process, chatting with the merged model (KV cache = no cache), export back to a Hugging
Face folder that generates the same tokens. The folder is benchmarks/hf_folder.py's "tiny":
SmolLM2's structure in miniature (transformers 5 config with rope_parameters, tied embeddings,
byte-level BPE tokenizer.json, ChatML template), random weights."""
import json

import pytest
import torch
import torch.distributed as dist

import data
import generate
import sft
import hf
import weights
from benchmarks.hf_folder import SHAPES, write_hf_folder
from sft_fixtures import WORDS, write_jsonl
from tests.distributed import run_distributed


def chats(n, seed):
    """Chat lines: reverse a word (a system turn in every other line, else ChatML's default one)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        w = WORDS[int(torch.randint(len(WORDS), (1,), generator=g))]
        turns = [{"role": "user", "content": f"Reverse {w}."},
                 {"role": "assistant", "content": w[::-1]}]
        out.append({"messages": ([{"role": "system", "content": "Be brief."}] if i % 2 else [])
                                + turns})
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    return {"hf": write_hf_folder(d / "hf", "tiny", n_merges=200, dtype=torch.float32),
            "train": write_jsonl(d / "train.jsonl", chats(24, 0)),
            "val": write_jsonl(d / "val.jsonl", chats(4, 1))}


def argv(files, out, extra=()):
    return ["--init", str(files["hf"]), "--data", str(files["train"]), "--val-data",
            str(files["val"]), "--out", str(out), "--lora-r", "4", "--batch-size", "8", "--lr",
            "2e-3", "--warmup-steps", "1", "--max-steps", "3", "--eval-every", "3", "--samples",
            "1", "--max-new-tokens", "4", "--log-every", "1", *extra]


def _tp2_zero3(rank, world, files, out):
    res = sft.main(argv(files, out, ["--tp", "2", "--zero", "3"]))
    return res["losses"], res["val_losses"], res["samples"]


def greedy(path, *extra):
    return generate.main([str(path), "--prompt", "Reverse kilo.", "--temperature", "0",
                          "--max-new-tokens", "12", *extra])


def test_lora_on_tp2_zero3_equals_one_process_then_chats_and_exports(tmp_path, files, capsys):
    one = sft.main(argv(files, tmp_path / "one"))
    assert (len(one["losses"]) == 3
            and all(torch.isfinite(torch.tensor(one["losses"] + one["val_losses"]))))
    # held-out replies: before training, after 3 steps
    assert one["val_losses"][-1] < one["val_losses"][0]
    # The same run on 4 ranks (tensor parallel 2 x data parallel 2, ZeRO-3 sharding the adapters):
    # the same losses to fp32 rounding (only the summation order differs), and the same answers to
    # the held-out prompt.
    for losses, val_losses, samples in run_distributed(_tp2_zero3, 4, files,
                                                       str(tmp_path / "four")):
        assert losses == pytest.approx(one["losses"], rel=1e-5)
        assert val_losses == pytest.approx(one["val_losses"], rel=1e-5)
        assert samples == one["samples"]
    merged = {d: torch.load(tmp_path / d / "merged.pt", weights_only=False)
              for d in ("one", "four")}
    assert merged["four"]["tokenizer"] == str(files["hf"].resolve())
    # transformers 5's form alone (rope_parameters, no top-level rope_theta) gave the model its
    # theta of 5e5.
    assert "rope_theta" not in json.loads((files["hf"] / "config.json").read_text())
    assert merged["four"]["model_config"]["rope_theta"] == 5e5
    for k, v in merged["one"]["model"].items():
        torch.testing.assert_close(merged["four"]["model"][k], v, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{k}: {m}")

    # Generate from the merged model: greedy with the KV cache = without it; and chat.
    path = tmp_path / "four" / "merged.pt"
    capsys.readouterr()
    new = greedy(path)
    assert len(new) == 12 and new == greedy(path, "--no-cache")
    chat = greedy(path, "--chat")  # (random weights: the text is noise)
    assert capsys.readouterr().out.count("tokens/s") == 6  # prefill and decode, three times

    # Export: a Hugging Face folder (config in both rotary forms, tied, the tokenizer's files) that
    # this project reads back and generates the same tokens from.
    hf_out = tmp_path / "hf_out"
    weights.main(["export-hf", str(path), str(hf_out)])
    config = json.loads((hf_out / "config.json").read_text())
    assert (config["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e5}
            and config["rope_theta"] == 5e5)
    # LoRA left the (tied) embedding and head untouched
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in hf.read_safetensors(hf_out / "model.safetensors")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (hf_out / f).is_file(), f
    assert json.loads((hf_out / "generation_config.json").read_text())["eos_token_id"] == \
        data.get_tokenizer(str(files["hf"])).encode_single_token("<|im_end|>")
    assert hf.import_hf(hf_out)["model_config"]["rope_theta"] == 5e5
    assert greedy(hf_out) == new and greedy(hf_out, "--chat") == chat


def test_a_reply_stops_at_im_end(tmp_path, files, capsys):
    """The folder's ChatML turn end stops a reply: a model rigged to always answer <|im_end|> (a
    large constant in the embedding's first dimension, which the final norm keeps, read by
    <|im_end|>'s row of the head)."""
    init = hf.import_hf(files["hf"])
    im_end = data.get_tokenizer(init["tokenizer"]).encode_single_token("<|im_end|>")
    sd = init["model"]
    sd["tok_emb.weight"][:, 0] = 1000.0
    sd["lm_head.weight"][im_end, 0] = 10.0
    torch.save(init, tmp_path / "rigged.pt")
    capsys.readouterr()
    assert greedy(tmp_path / "rigged.pt", "--chat") == []
    assert capsys.readouterr().out.splitlines()[-1].endswith("stopped at end-of-text")


def test_heads_that_do_not_split_over_tp_are_refused_before_any_group(tmp_path, files, capsys,
                                                                       monkeypatch):
    """SmolLM2-135M's 9 heads / 3 KV heads (here in miniature, head 8) do not divide by --tp 2: one
    line, exit 2, before a process group is built (rank 0 of a world of 4 that does not exist would
    hang otherwise)."""
    shape = SHAPES["tiny"] | {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3}
    folder = write_hf_folder(tmp_path / "nine", shape, n_merges=200, dtype=torch.float32)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        sft.main(argv(files | {"hf": folder}, tmp_path / "o", ["--tp", "2", "--zero", "3"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and not dist.is_initialized() and err.count("\n") == 1
    assert "--tp 2 does not divide the model's n_head 9" in err
