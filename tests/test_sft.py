import json
import zlib
from dataclasses import replace

import pytest
import torch

import chat
import checkpoint
import data
import sft
import sft_data
import training
import weights
from amp import DynamicLossScaler, MixedPrecisionOptimizer
from model import Transformer
from sft_data import DEFAULT_MAX_BYTES, SFT_VAL_EVERY, build_default_data
from topology import Topology
from sft_fixtures import CFG, make_init, reverse_examples, write_jsonl

ENC = data.get_tokenizer("bytes")
EOT = data.eot_id(ENC)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    return {"init": make_init(d / "init"),
            "train": write_jsonl(d / "train.jsonl", reverse_examples(96)),
            "val": write_jsonl(d / "val.jsonl", reverse_examples(16, seed=1)), "dir": d}


def run(files, out, *extra):
    return sft.main(["--init", str(files["init"]), "--data", str(files["train"]),
                     "--val-data", str(files["val"]), "--out", str(out), "--batch-size", "8",
                     "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1",
                     "--samples", "1", "--max-new-tokens", "8", *extra])


def rows_of(lines, prompt_mask=True):
    ex = [(f"f:{i}", chat.to_messages(l, f"f:{i}")) for i, l in enumerate(lines, 1)]
    return sft_data.tokenize(ex, ENC, CFG.block_size, prompt_mask)[0]


def test_sft_batches_step_as_pretraining_does():
    """batches.step_items orders SFT examples as it orders token windows: a step's examples are the
    ranks' micro-batches, rank 0's first; each epoch takes every example once, in a new order."""
    rows, make = list(range(12)), list
    one = sft_data.SFTBatches(rows, 4, make, seed=3)
    ranks = [sft_data.SFTBatches(rows, 4, make, rank=r, world=2, n_micro=2, seed=3)
             for r in range(2)]
    seen = []
    for _ in range(6):  # two epochs of 3 steps
        step, = one.next()
        assert [i for b in ranks for micro in b.next() for i in micro] == step and len(step) == 4
        seen += step
    assert sorted(seen[:12]) == rows == sorted(seen[12:]) and seen[:12] != seen[12:]


def test_both_formats_learn_exactly_the_responses():
    alpaca = {"instruction": "Reverse the word.", "input": "golf", "output": "flog"}
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "Again"},
                         {"role": "assistant", "content": "Hello!"}]}
    (xa, ya), (xc, yc) = rows_of([alpaca, chat])
    assert ENC.decode(xa) == ("### Instruction:\nReverse the word.\n\n### Input:\ngolf\n\n"
                              "### Response:\nflog")
    assert [t for t in ya if t != -100] == ENC.encode_ordinary("flog") + [EOT]
    # Both assistant turns (with their end-of-text) are learned; system, user and headers are not.
    assert [t for t in yc if t != -100] == (ENC.encode_ordinary("Hello") + [EOT]
                                            + ENC.encode_ordinary("Hello!") + [EOT])
    # Without the mask every label is the next token.
    (xn, yn), = rows_of([alpaca], prompt_mask=False)
    assert xn == xa and yn == xa[1:] + [EOT]


def test_prompt_tokens_get_no_gradient():
    """d loss / d logits is exactly zero at every prompt (and padding) position, non-zero at every
    response position; without the mask those prompt positions get gradient (the test can fail)."""
    torch.manual_seed(0)
    model = Transformer(CFG).double()
    lines = reverse_examples(4)
    x, y_masked = sft_data.collate(rows_of(lines), EOT)
    _, y_all = sft_data.collate(rows_of(lines, prompt_mask=False), EOT)
    prompt = (y_masked == -100) & (y_all != -100)
    assert prompt.sum() > 3 * (y_masked != -100).sum()  # most of each example is prompt
    for y in (y_masked, y_all):
        logits = model.head(model.body(model.embed(x)))[0]
        logits.retain_grad()
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1),
                                                 ignore_index=-100)
        loss.backward()
        per_position = logits.grad.abs().sum(-1)
        assert (per_position[y != -100] > 0).all() and (per_position[y == -100] == 0).all()
        if y is y_masked:
            assert (per_position[prompt] == 0).all()
        else:
            assert (per_position[prompt] > 0).all()


def test_padding_isolates_examples():
    """An example's logits are equal alone and padded in a batch beside a longer one (float64)."""
    torch.manual_seed(0)
    model = Transformer(CFG).double()
    short, long = rows_of([{"instruction": "Hi", "output": "yo"}, reverse_examples(1)[0]])
    alone = model(torch.tensor([short[0]]))[0][0]
    x, _ = sft_data.collate([short, long], EOT)
    together = model(x)[0][0, :len(short[0])]
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)


def test_accumulation_divides_by_the_steps_response_tokens():
    """Four micro-batches with unequal response token counts give the gradient of one batch of all
    eight (float64: up to summation order); a per-micro-batch mean would not (checked)."""
    rows = rows_of(reverse_examples(8) + [{"instruction": "Say a long thing.",
                                           "output": "x" * 40}])[:8]
    rows[1] = rows_of([{"instruction": "Say a long thing.", "output": "x" * 40}])[0]
    torch.manual_seed(0)
    model = Transformer(CFG).double()
    opt = MixedPrecisionOptimizer([{"params": list(model.parameters())}],
                                  lambda g: torch.optim.SGD(g, lr=0), torch.float64,
                                  DynamicLossScaler(False))

    def grads(micro_batches):
        model.zero_grad()
        loss = training.forward_backward(model, micro_batches, Topology(), "1f1b",
                                         opt.scale_loss, "cpu")
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    full_loss, full = grads([sft_data.collate(rows, EOT)])
    micro = [sft_data.collate(rows[i:i + 2], EOT) for i in range(0, 8, 2)]
    counts = [int((y != -100).sum()) for _, y in micro]
    assert len(set(counts)) > 1, counts
    acc_loss, acc = grads(micro)
    assert acc_loss == pytest.approx(full_loss, rel=1e-12)
    for a, b in zip(full, acc):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    model.zero_grad()  # the per-micro-batch mean weights tokens unequally: a different gradient
    for x, y in micro:
        (model(x, y)[1] / len(micro)).backward()
    assert not all(torch.allclose(p.grad, g, rtol=1e-6) for p, g in zip(model.parameters(), full))


def test_sft_learns_logs_checkpoints_and_answers(tmp_path, files):
    res = run(files, tmp_path / "o", "--max-steps", "30", "--eval-every", "15")
    vals = res["val_losses"]
    # the held-out responses' loss falls from ~5.8 (random init)
    assert len(vals) == 3 and vals[-1] < vals[0] - 1.0, vals
    lines = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [l["val_loss"] for l in lines if "val_loss" in l] == vals
    assert (len([l for l in lines if "loss" in l]) == 30
            and {"lr", "grad_norm", "tokens_per_s"} <= set(lines[1]))
    ckpt = checkpoint.read_meta(tmp_path / "o" / "step_000030")
    assert {"step", "data", "model_config", "tokenizer", "args", "identity", "files"} <= set(ckpt)
    assert ckpt["step"] == 30 and ckpt["lora"] is None
    assert len(res["samples"]) == 1 and (tmp_path / "o" / "samples.jsonl").exists()
    # The output is itself an --init: evaluating it alone reproduces the last held-out loss.
    again = sft.main(["--init", str(tmp_path / "o"), "--data", str(files["train"]), "--val-data",
                      str(files["val"]), "--out", str(tmp_path / "e"), "--max-steps", "0",
                      "--samples", "0", "--batch-size", "8", "--grad-accum", "2"])
    assert again["val_losses"] == [pytest.approx(vals[-1], rel=1e-6)]


def test_resume_is_exact(tmp_path, files):
    """Stopped at step 3 of 6 and resumed: the same losses bit for bit (fp32, CPU), same weights."""
    whole = run(files, tmp_path / "w", "--max-steps", "6", "--samples", "0")
    first = run(files, tmp_path / "s", "--max-steps", "6", "--stop-after", "3", "--samples", "0")
    second = run(files, tmp_path / "s", "--max-steps", "6", "--resume", "--samples", "0")
    assert first["step"] == 3 and second["step"] == 6
    assert first["losses"] + second["losses"] == whole["losses"]
    for a, b in zip(whole["model"].parameters(), second["model"].parameters()):
        assert torch.equal(a, b)


def test_lora_sft_trains_only_adapters_and_exports(tmp_path, files):
    res = run(files, tmp_path / "l", "--max-steps", "20", "--eval-every", "20", "--lora-r", "4",
              "--lora-targets", "wq,wv,w2", "--lr", "2e-2")
    # A random base's frozen head (std 0.02) caps how far its logits can move, so only a modest drop
    # is possible here; the point of this test is the mechanics (frozen base, adapters, export), the
    # drop that it trains.
    assert res["val_losses"][-1] < res["val_losses"][0] - 0.1, res["val_losses"]
    init = torch.load(files["init"], weights_only=False)["model"]
    step = tmp_path / "l" / "step_000020"
    trained = (checkpoint.read_meta(step)
               | {"model": weights.full_state_dict(step, checkpoint.read_meta(step))})
    assert trained["lora"]["r"] == 4
    for k, v in init.items():  # every base weight is exactly as it was
        assert torch.equal(trained["model"][k], v), k
    adapter = torch.load(tmp_path / "l" / "adapter.pt", weights_only=False)["adapter"]
    assert (sorted(adapter) == sorted(k for k in trained["model"] if ".lora_" in k)
            and len(adapter) == 2 * 3 * 2)
    # The merged export and the adapter loaded onto the base both reproduce the final held-out loss.
    common = ["--data", str(files["train"]), "--val-data", str(files["val"]), "--max-steps", "0",
              "--samples", "0", "--batch-size", "8", "--grad-accum", "2"]
    merged = sft.main(["--init", str(tmp_path / "l" / "merged.pt"), "--out", str(tmp_path / "m"),
                       *common])
    loaded = sft.main(["--init", str(files["init"]),
                       "--adapter", str(tmp_path / "l" / "adapter.pt"),
                       "--out", str(tmp_path / "a"), *common])
    assert merged["val_losses"][0] == pytest.approx(res["val_losses"][-1], rel=1e-5)
    assert loaded["val_losses"][0] == pytest.approx(res["val_losses"][-1], rel=1e-6)


MODULE = '''
def short(a, b=1):
    """Add two numbers.

    More detail that is not part of the instruction."""
    # a comment stays
    return a + b


class K:
    def method(self, x):
        """Double x."""
        return 2 * x

    def nodoc(self):
        return 1

    def only_doc(self):
        """Nothing else."""


def long_one(x):
    """Far too long."""
    return ''' + '"' + "y" * 300 + '"' + '''
'''


def test_default_data_from_functions(tmp_path):
    """Docstring -> instruction, the rest -> response; too long ones counted; split by module."""
    docs = [(f"pkg/mod{i}.py", MODULE) for i in range(30)]
    held = sum(zlib.crc32(name.encode()) % SFT_VAL_EVERY == 0 for name, _ in docs)
    counts = build_default_data(docs, tmp_path,
                                lambda ex: chat.encode(ENC, chat.to_messages(ex, "-"))[0])
    assert 0 < held < 30 and counts == {"functions": 3 * 30, "too_long": 30,
                                        "train": 2 * (30 - held), "val": 2 * held}
    rows = [json.loads(l) for l in (tmp_path / "train.jsonl").read_text().splitlines()]
    val_modules = {json.loads(l)["module"]
                   for l in (tmp_path / "val.jsonl").read_text().splitlines()}
    assert val_modules.isdisjoint(r["module"] for r in rows)
    assert rows[0]["instruction"] == ("Write a Python function `short(a, b=1)` that: "
                                      "Add two numbers.")
    assert rows[0]["output"] == "def short(a, b=1):\n    # a comment stays\n    return a + b"
    # dedented out of its class
    assert rows[1]["output"] == "def method(self, x):\n    return 2 * x"
    assert all(len(chat.encode(ENC, chat.to_messages(r, "-"))[0]) <= DEFAULT_MAX_BYTES
               for r in rows)


def error_of(capsys, argv):
    capsys.readouterr()  # only this call's output: an earlier run's warnings are not part of it
    with pytest.raises(SystemExit) as e:
        sft.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("sft.py: error: "), err
    return err


def test_bad_input_gets_one_clear_line(tmp_path, capsys, files):
    base = ["--init", str(files["init"]), "--val-data", str(files["val"]), "--out",
            str(tmp_path / "o")]
    good = json.dumps(reverse_examples(1)[0])
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, "", good, '{"instruction": "x", "output": '])
    assert f"{bad}:4: not valid JSON" in error_of(capsys, base + ["--data", str(bad)])
    bad = write_jsonl(tmp_path / "miss.jsonl", [good, {"instruction": "x", "response": "y"}])
    assert f"{bad}:2: missing field 'output'" in error_of(capsys, base + ["--data", str(bad)])
    bad = write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "bot", "content": "y"}]}])
    assert f"{bad}:1: each message needs \"role\"" in error_of(capsys, base + ["--data", str(bad)])
    bad = write_jsonl(tmp_path / "long.jsonl", [good, {"instruction": "z" * 200, "output": "y"}])
    assert f"{bad}:2: the prompt is 233 tokens, longer than the model's context of 128" in error_of(
        capsys, base + ["--data", str(bad)])
    data_flag = ["--data", str(files["train"])]
    assert "--init" in error_of(capsys, ["--init", str(tmp_path / "nope")] + data_flag)
    assert "of another model config than --model tiny (differs in" in error_of(
        capsys, base + data_flag + ["--model", "tiny"])
    other = make_init(tmp_path / "other", replace(CFG, d_model=64, n_head=4))
    run(files, tmp_path / "r", "--max-steps", "1", "--samples", "0", "--lora-r", "2")
    err = error_of(capsys, ["--init", str(other), "--out", str(tmp_path / "r"),
                            "--resume"] + data_flag)
    assert "holds another run (" in err and "model config d_model 32, not 64" in err, err
    assert "was trained on another model config (differs in d_model)" in error_of(
        capsys, ["--init", str(other), "--adapter", str(tmp_path / "r" / "adapter.pt")] + data_flag)
    assert ("--lora-targets wq,attn: attn is not a linear of the blocks; choose from wq,wk"
            in error_of(capsys, base + data_flag + ["--lora-r", "4", "--lora-targets", "wq,attn"]))
    assert "world size 1 is not divisible by --tp 3" in error_of(
        capsys, base + data_flag + ["--tp", "3"])
    bad = write_jsonl(tmp_path / "pack.jsonl",
                      [good, {"instruction": "Say x.", "output": "x" * 80}])
    assert (f"{bad}:2: the example is 119 tokens, longer than --seq-len of 100: --pack never cuts"
            in error_of(capsys, base + ["--data", str(bad), "--pack", "--seq-len", "100"]))
    assert ("--lora-r 40 is larger than wq's smaller side (32 -> 32): choose --lora-r <= 16"
            in error_of(capsys, base + data_flag + ["--lora-r", "40"]))
    assert "does not divide" in error_of(
        capsys, base + data_flag + ["--batch-size", "6", "--grad-accum", "4"])


# ------------------------------------------------------------------------------------------ packing
def packed_and_padded():
    """Examples of 34 to 120 tokens: up to three share a packed row of 128."""
    lines = [{"instruction": "Say x.", "output": "x" * n}
             for n in (1, 5, 20, 3, 40, 8, 2, 81)] + reverse_examples(3)
    rows = rows_of(lines)
    return rows, sft_data.pack(rows, EOT, CFG.block_size), sft_data.collate(rows, EOT)


def segments(rows, x, packing):
    """(example index, row, start, end) of every example in packed rows: the runs of one document
    id, matched to the example by their tokens (the padding's run matches none)."""
    out = []
    for r in range(x.shape[0]):
        doc = packing["doc"][r]
        for d in doc.unique().tolist():
            where = (doc == d).nonzero().flatten()
            a, b = where[0].item(), where[-1].item() + 1
            match = [i for i, (xi, _) in enumerate(rows) if xi == x[r, a:b].tolist()]
            if match:
                out.append((match[0], r, a, b))
    return out


@pytest.mark.parametrize("attn", ["naive", "sdpa"])
def test_packed_examples_lose_and_learn_exactly_as_padded(attn):
    """An example's summed loss in packed rows equals its padded row's (float64, 1e-12), as do the
    batch loss's gradients: positions restart at each example and attention stays inside it."""
    rows, (xp, yp, packing), (x, y) = packed_and_padded()
    assert xp.shape[0] < x.shape[0] and xp.numel() < x.numel()  # fewer rows, less padding
    torch.manual_seed(0)
    model = Transformer(replace(CFG, attn=attn)).double()
    per_padded = model(x, y, reduction="none")[1].view(y.shape).sum(1)
    per_packed = model(xp, yp, reduction="none", **packing)[1].view(yp.shape)
    found = segments(rows, xp, packing)
    assert sorted(i for i, *_ in found) == list(range(len(rows)))  # every example once
    for i, r, a, b in found:
        assert per_packed[r, a:b].sum().item() == pytest.approx(per_padded[i].item(), rel=1e-12)
    grads = []
    for args, kw in (((x, y), {}), ((xp, yp), packing)):
        model.zero_grad()
        model(*args, reduction="sum", **kw)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_attention_never_crosses_packed_examples():
    """Change one packed example's tokens: every other example's logits stay exactly as they were
    (its own change); with the document ids dropped (a plain causal mask over the row), later
    examples would change."""
    rows, (xp, yp, packing), _ = packed_and_padded()
    torch.manual_seed(0)
    model = Transformer(CFG).double()
    # the first example of row 0
    _, r, a, b = min(segments(rows, xp, packing), key=lambda s: (s[1], s[2]))
    assert (packing["doc"][r] > 0).any()  # the row holds examples after the perturbed one
    changed = xp.clone()
    changed[r, a:b] = torch.randint(0, 256, (b - a,), generator=torch.Generator().manual_seed(1))
    for kw, isolated in ((packing, True), ({"pos": packing["pos"]}, False)):
        before, after = model(xp, **kw)[0], model(changed, **kw)[0]
        inside = torch.zeros(xp.shape, dtype=torch.bool)
        inside[r, a:b] = True
        assert not torch.allclose(before[inside], after[inside])
        assert torch.equal(before[~inside], after[~inside]) == isolated


def test_a_run_that_cannot_train_stops_with_the_reason(tmp_path, capsys, files):
    """As pretrain.py: fp16 at --lr 1 stops (exit 3) in one line; the good checkpoint is kept."""
    with pytest.raises(SystemExit) as e:
        run(files, tmp_path / "o", "--lr", "1", "--amp", "fp16", "--max-steps", "100",
            "--save-every", "2", "--samples", "0")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 3 and "\n" not in err, err
    assert (err.startswith("sft.py: stopped: step ") and "in a row" in err
            and "last good checkpoint" in err)
    step = int(err.split("at step ")[-1])
    assert checkpoint.find(tmp_path / "o")[1]["step"] == step
