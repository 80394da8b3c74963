import contextlib
import io
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import data
import pretrain
from model import PRESETS, Transformer
from tests.distributed import run_distributed

# A small, fast run: the tiny preset on 64-token windows of the embedded default corpus.
FAST = ["--model", "tiny", "--seq-len", "64", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
        "--eval-iters", "2", "--sample-tokens", "0", "--log-every", "1"]


def run(tmp_path, *extra, name="run"):
    return pretrain.main(FAST + ["--out", str(tmp_path / name), *extra])


def test_training_learns_and_logs(tmp_path, stdlib_data):
    out = run(tmp_path, "--max-steps", "40", "--eval-every", "40", "--sample-tokens", "20")
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [l["val_loss"] for l in lines if "val_loss" in l]
    steps = [l for l in lines if "loss" in l]
    assert len(steps) == 40 and {"step", "loss", "lr", "tokens_per_s", "mfu", "grad_norm"} <= set(steps[0])
    assert vals[-1] < vals[0] - 1.5, vals  # from ~5.8 (uniform over 320) to well under 4.3
    assert (tmp_path / "run" / "ckpt.pt").exists() and len((tmp_path / "run" / "sample.txt").read_text()) > 0
    assert out["step"] == 40


def test_resume_is_bitwise_exact_in_fp32(tmp_path, stdlib_data):
    whole = run(tmp_path, "--max-steps", "8", name="whole")
    first = run(tmp_path, "--max-steps", "8", "--stop-after", "4", name="split")
    second = run(tmp_path, "--max-steps", "8", "--resume", name="split")
    assert first["step"] == 4 and second["step"] == 8
    assert first["losses"] + second["losses"] == whole["losses"]  # exact float equality, loss for loss
    for a, b in zip(whole["model"].parameters(), second["model"].parameters()):
        assert torch.equal(a, b)


def test_resume_restores_the_fp16_loss_scale(tmp_path, stdlib_data):
    whole = run(tmp_path, "--max-steps", "6", "--amp", "fp16", name="whole")
    run(tmp_path, "--max-steps", "6", "--amp", "fp16", "--stop-after", "3", name="split")
    second = run(tmp_path, "--max-steps", "6", "--amp", "fp16", "--resume", name="split")
    assert whole["opt"].scaler.state_dict() == second["opt"].scaler.state_dict()
    assert whole["losses"][3:] == second["losses"]


def test_gradient_accumulation_equals_the_full_batch(stdlib_data):
    """Batch B in one micro-step and B/4 in four give the same loss and gradient (float64: up to rounding)."""
    cfg = replace(PRESETS["tiny"], vocab_size=320)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    grads, losses = [], []
    for grad_accum in (1, 4):
        batches = data.Batches(stdlib_data, 64, global_batch=8, n_micro=grad_accum, seed=5)
        model.zero_grad()
        total = 0.0
        for x, y in batches.next():
            _, loss = model(x, y)
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
        losses.append(total)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_gradient_accumulation_end_to_end(tmp_path, stdlib_data):
    one = run(tmp_path, "--max-steps", "3", name="a1")
    four = run(tmp_path, "--max-steps", "3", "--grad-accum", "4", name="a4")
    # fp32, different summation order: the losses agree to float32 rounding, amplified a little by 3 steps.
    assert four["losses"] == pytest.approx(one["losses"], rel=1e-5)


def test_estimate_counts_the_model_as_built():
    est = pretrain.main(["--model", "gpt2-124m", "--estimate", "--chinchilla"])
    model = Transformer(PRESETS["gpt2-124m"])  # real tensors this time
    n = sum(p.numel() for p in model.parameters())
    n_mm = n - model.tok_emb.weight.numel()
    assert est["params"] == n and est["matmul_params"] == n_mm
    assert est["flops_per_token"] == 6 * n_mm + 6 * 12 * 768 * 1024
    assert est["tokens"] == 20 * n


def error_of(capsys, argv):
    capsys.readouterr()  # only this call's output: an earlier run's warnings are not part of it
    with pytest.raises(SystemExit) as e:
        pretrain.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err  # one line
    return err


def test_bad_input_gets_one_clear_line(tmp_path, capsys, stdlib_data):
    out = ["--out", str(tmp_path / "o")]
    assert "invalid choice: 'huge'" in error_of(capsys, ["--model", "huge"])
    assert "--seq-len 4096 is outside model 'tiny'" in error_of(capsys, ["--seq-len", "4096"] + out)
    assert "--grad-accum must be at least 1, got 0" in error_of(capsys, ["--grad-accum", "0"] + out)
    assert "no such folder" in error_of(capsys, ["--data", str(tmp_path / "nope")] + out)
    (tmp_path / "empty").mkdir()
    assert "no meta.json" in error_of(capsys, ["--data", str(tmp_path / "empty")] + out)
    assert "prepared with tokenizer 'bytes', not --tokenizer 'gpt2'" in error_of(
        capsys, ["--data", str(stdlib_data), "--tokenizer", "gpt2"] + out)
    assert "--resume: no checkpoint" in error_of(capsys, ["--resume"] + out)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert "is corrupt" in error_of(capsys, ["--resume"] + out)
    assert "does not divide" in error_of(capsys, ["--batch-size", "6", "--grad-accum", "4"] + out)


def test_resume_refuses_another_model(tmp_path, capsys, stdlib_data):
    run(tmp_path, "--max-steps", "1")
    err = error_of(capsys, FAST + ["--model", "small", "--out", str(tmp_path / "run"), "--resume"])
    assert "another model config" in err


def test_sampling_never_draws_vocabulary_padding(tmp_path, stdlib_data, monkeypatch):
    """The vocabulary is padded 257 -> 320; after one step the model is still near uniform over all 320 ids, so
    60 draws that could reach the padding would (each has a ~20% chance; all missing it: ~1e-6)."""
    drawn, generate = [], Transformer.generate

    def recording(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        drawn.extend(out[0].tolist())
        return out

    monkeypatch.setattr(Transformer, "generate", recording)
    run(tmp_path, "--max-steps", "1", "--sample-tokens", "60")
    assert len(drawn) >= 60 and max(drawn) < 257, sorted(set(drawn))[-5:]
    assert len((tmp_path / "run" / "sample.txt").read_text()) > 0


def test_default_warmup_follows_the_run_and_mfu_stays_below_one(tmp_path, stdlib_data):
    """Without --warmup-steps a 10-step run warms up for 1 step (a tenth), so it reaches --lr at once; on a CPU
    the MFU's peak is raised to any throughput the run beats it with, so it never reads above 100%."""
    flags = [f for i, f in enumerate(FAST) if "--warmup-steps" not in FAST[max(0, i - 1):i + 1]]
    pretrain.main(flags + ["--max-steps", "10", "--out", str(tmp_path / "run")])
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps[0]["lr"] == pytest.approx(3e-3) and steps[-1]["lr"] < 3e-3
    assert all(0 < s["mfu"] <= 1 for s in steps)


def test_a_run_that_cannot_train_stops_with_the_reason(tmp_path, capsys, stdlib_data):
    """fp16 at --lr 1: the residual stream overflows fp16 within a few steps and every later step is skipped. The
    run must end with exit status 3 and one line naming the cause and the last good checkpoint, within
    K (= 8) steps of the first non-finite loss, and never save a checkpoint over the good one."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--amp", "fp16", "--lr", "1", "--max-steps", "200", "--save-every", "2", "--seq-len", "16",
            "--batch-size", "2", "--eval-iters", "1")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 3 and "\n" not in err, err
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    first_bad = next(i for i, l in enumerate(losses) if l != l) + 1  # steps count from 1
    stop = records[-1]
    assert stop["step"] == first_bad + 7 and "the loss was nan for 8 steps in a row" in stop["stopped"]
    good = max(s for s in range(2, first_bad, 2))  # the last even step before the loss went nan
    assert err.startswith(f"pretrain.py: stopped: step {stop['step']}: the loss was nan") and "--amp bf16" in err
    assert err.endswith(f"last good checkpoint: {tmp_path / 'run'} at step {good}")
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["step"] == good


def _diverge(rank, world, out, cache):
    os.environ["LLM_DATA_CACHE"] = cache
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        run(Path(out), "--amp", "fp16", "--lr", "1", "--max-steps", "200", "--seq-len", "16", "--batch-size", "2",
            "--eval-iters", "1", "--pp", "2", "--microbatches", "2")
    return e.value.code, err.getvalue(), dist.is_initialized()


def test_every_rank_stops_at_the_same_step(tmp_path, stdlib_data, data_cache):
    """Under --pp 2 the last stage computes the loss: the guard sees it (all-reduced to every stage), so both ranks
    stop together (a rank left behind would hang in its next send), and only rank 0 prints the line."""
    (code0, err0, group0), (code1, err1, group1) = run_distributed(_diverge, 2, str(tmp_path), str(data_cache))
    assert (code0, code1) == (3, 3) and err1 == "" and not group0 and not group1
    assert err0.startswith("pretrain.py: stopped: step ") and err0.count("\n") == 1, err0
