import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import checkpoint
import pretrain
import training
from batches import Batches
from model import PRESETS, Transformer
from tests.distributed import run_distributed

# A small, fast run: the tiny preset on 64-token windows of the embedded default corpus.
ROOT = Path(__file__).resolve().parent.parent
FAST = ["--model", "tiny", "--seq-len", "64", "--batch-size", "8", "--lr", "3e-3",
        "--warmup-steps", "2", "--eval-iters", "2", "--sample-tokens", "0", "--log-every", "1"]


def run(tmp_path, *extra, name="run"):
    return pretrain.main(FAST + ["--out", str(tmp_path / name), *extra])


def test_training_learns_and_logs(tmp_path, stdlib_data):
    out = run(tmp_path, "--max-steps", "40", "--eval-every", "40", "--sample-tokens", "20")
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [l["val_loss"] for l in lines if "val_loss" in l]
    steps = [l for l in lines if "loss" in l]
    assert (len(steps) == 40
            and {"step", "loss", "lr", "tokens_per_s", "mfu", "grad_norm"} <= set(steps[0]))
    assert vals[-1] < vals[0] - 1.5, vals  # from ~5.8 (uniform over 320) to well under 4.3
    assert (tmp_path / "run" / "step_000040" / "meta.json").exists()
    assert len((tmp_path / "run" / "sample.txt").read_text()) > 0
    assert out["step"] == 40


def test_resume_is_bitwise_exact_in_fp32(tmp_path, stdlib_data):
    whole = run(tmp_path, "--max-steps", "8", name="whole")
    first = run(tmp_path, "--max-steps", "8", "--stop-after", "4", name="split")
    second = run(tmp_path, "--max-steps", "8", "--resume", name="split")
    assert first["step"] == 4 and second["step"] == 8
    # exact float equality, loss for loss
    assert first["losses"] + second["losses"] == whole["losses"]
    for a, b in zip(whole["model"].parameters(), second["model"].parameters()):
        assert torch.equal(a, b)


def test_resume_restores_the_fp16_loss_scale(tmp_path, stdlib_data):
    whole = run(tmp_path, "--max-steps", "6", "--amp", "fp16", name="whole")
    run(tmp_path, "--max-steps", "6", "--amp", "fp16", "--stop-after", "3", name="split")
    second = run(tmp_path, "--max-steps", "6", "--amp", "fp16", "--resume", name="split")
    assert whole["opt"].scaler.state_dict() == second["opt"].scaler.state_dict()
    assert whole["losses"][3:] == second["losses"]


def test_gradient_accumulation_equals_the_full_batch(stdlib_data):
    """Batch B in one micro-step, B/4 in four: equal loss and gradient (float64: up to rounding)."""
    cfg = replace(PRESETS["tiny"], vocab_size=320)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    grads, losses = [], []
    for grad_accum in (1, 4):
        batches = Batches(stdlib_data, 64, global_batch=8, n_micro=grad_accum, seed=5)
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
    # fp32, different summation order: the losses agree to float32 rounding, amplified a little
    # by 3 steps.
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
    assert "--resume: no complete checkpoint in" in error_of(capsys, ["--resume"] + out)
    (tmp_path / "o" / "step_000001").mkdir(parents=True)
    (tmp_path / "o" / "step_000001" / "meta.json").write_bytes(b"not a checkpoint index")
    assert "step_000001/meta.json: missing or not a checkpoint index" in error_of(capsys, out)
    assert "--resume and --fresh contradict" in error_of(capsys, ["--resume", "--fresh"] + out)
    assert "does not divide" in error_of(capsys, ["--batch-size", "6", "--grad-accum", "4"] + out)


def test_resume_refuses_another_model(tmp_path, capsys, stdlib_data):
    run(tmp_path, "--max-steps", "1")
    err = error_of(capsys, FAST + ["--model", "small", "--out", str(tmp_path / "run")])
    # Every difference in one line (not one per attempt), and no mention of a --resume not given.
    assert "holds another run (" in err and "model config d_model 128, not 384" in err, err
    assert "model config n_layer 4, not 6" in err and "--resume" not in err


def test_sampling_never_draws_vocabulary_padding(tmp_path, stdlib_data, monkeypatch):
    """The vocabulary is padded 257 -> 320; after one step the model is still near uniform over all
    320 ids, so 60 draws that could reach the padding would (~20% each; all missing it: ~1e-6)."""
    drawn, generate = [], Transformer.generate

    def recording(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        drawn.extend(out[0].tolist())
        return out

    monkeypatch.setattr(Transformer, "generate", recording)
    run(tmp_path, "--max-steps", "1", "--sample-tokens", "60")
    assert len(drawn) >= 60 and max(drawn) < 257, sorted(set(drawn))[-5:]
    assert len((tmp_path / "run" / "sample.txt").read_text()) > 0


def test_the_same_command_line_starts_and_after_a_crash_resumes(tmp_path, stdlib_data,
                                                                monkeypatch, capsys):
    """What `torchrun --max-restarts N` does after a crash: run the same command line again. It
    resumes from the last complete step (4: saved every 2, killed during step 6) and ends with the
    uninterrupted run's losses; metrics.jsonl holds one history."""
    whole = run(tmp_path, "--max-steps", "8", name="whole")
    argv = ["--max-steps", "8", "--save-every", "2"]
    real_step, calls = training.train_step, []

    def crash_in_step_6(r):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("killed")
        return real_step(r)
    monkeypatch.setattr(training, "train_step", crash_in_step_6)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, *argv, name="crash")
    monkeypatch.setattr(training, "train_step", real_step)
    again = run(tmp_path, *argv, name="crash")
    assert again["losses"] == whole["losses"][4:]  # fp32, one process: bit for bit
    records = [json.loads(l)
               for l in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    # Another batch size on the same --out: refused in one line, with the reason.
    err = error_of(capsys, FAST + argv + ["--batch-size", "16", "--out", str(tmp_path / "crash")])
    assert ("holds another run (--batch-size 8, not 16 (the data position and the schedule "
            "count steps") in err
    err = error_of(capsys, FAST + argv + ["--batch-size", "16", "--lr", "0.5",
                                          "--out", str(tmp_path / "crash")])
    assert "--batch-size 8, not 16" in err and "--lr 0.003, not 0.5" in err, err


def test_init_starts_from_weights_with_a_fresh_optimizer(tmp_path, stdlib_data, capsys):
    first = run(tmp_path, "--max-steps", "4", "--eval-every", "4", name="a")
    vals = [json.loads(l)["val_loss"]
            for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in l]
    again = run(tmp_path, "--max-steps", "2", "--eval-every", "2", "--init", str(tmp_path / "a"),
                name="b")
    val0 = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    # a's final weights, evaluated again: the same loss
    assert val0["step"] == 0 and val0["val_loss"] == vals[-1]
    step = next(iter(again["opt"].optimizer.state.values()))["step"]
    assert int(step) == 2 and first["step"] == 4  # AdamW started over
    err = error_of(capsys, FAST + ["--model", "small", "--init", str(tmp_path / "a"),
                                   "--out", str(tmp_path / "c")])
    assert err.endswith(f"--init {tmp_path / 'a'}: its block_size is 256, this run's model has "
                        "512 (choose the matching --model; the vocabulary follows the data)")


def test_default_warmup_follows_the_run_and_mfu_stays_below_one(tmp_path, stdlib_data):
    """Without --warmup-steps a 10-step run warms up for 1 step (a tenth), so it reaches --lr at
    once; on a CPU the MFU's peak is raised to any throughput the run beats it with, so it never
    reads above 100%."""
    flags = [f for i, f in enumerate(FAST) if "--warmup-steps" not in FAST[max(0, i - 1):i + 1]]
    pretrain.main(flags + ["--max-steps", "10", "--out", str(tmp_path / "run")])
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in l]
    assert steps[0]["lr"] == pytest.approx(3e-3) and steps[-1]["lr"] < 3e-3
    assert all(0 < s["mfu"] <= 1 for s in steps)


def test_a_run_that_cannot_train_stops_with_the_reason(tmp_path, capsys, stdlib_data):
    """fp16 at --lr 1: the residual stream overflows fp16 within a few steps and every later step is
    skipped. The run must end with exit status 3 and one line naming the cause and the last good
    checkpoint, within K (= 8) steps of the first non-finite loss, and never save a checkpoint over
    the good one."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--amp", "fp16", "--lr", "1", "--max-steps", "200", "--save-every", "2",
            "--seq-len", "16", "--batch-size", "2", "--eval-iters", "1")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 3 and "\n" not in err, err
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    first_bad = next(i for i, l in enumerate(losses) if l != l) + 1  # steps count from 1
    stop = records[-1]
    assert (stop["step"] == first_bad + 7
            and "the loss was nan for 8 steps in a row" in stop["stopped"])
    good = max(s for s in range(2, first_bad, 2))  # the last even step before the loss went nan
    assert (err.startswith(f"pretrain.py: stopped: step {stop['step']}: the loss was nan")
            and "--amp bf16" in err)
    assert err.endswith(f"last good checkpoint: {tmp_path / 'run'} at step {good}")
    assert checkpoint.find(tmp_path / "run")[1]["step"] == good


def _diverge(rank, world, out, cache):
    os.environ["LLM_DATA_CACHE"] = cache
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        run(Path(out), "--amp", "fp16", "--lr", "1", "--max-steps", "200", "--seq-len", "16",
            "--batch-size", "2", "--eval-iters", "1", "--pp", "2", "--microbatches", "2")
    return e.value.code, err.getvalue(), dist.is_initialized()


def test_every_rank_stops_at_the_same_step(tmp_path, stdlib_data, data_cache):
    """Under --pp 2 the last stage computes the loss: the guard sees it (all-reduced to every
    stage), so both ranks stop together (a rank left behind would hang in its next send), and only
    rank 0 prints the line."""
    (code0, err0, group0), (code1, err1, group1) = run_distributed(_diverge, 2, str(tmp_path),
                                                                   str(data_cache))
    assert (code0, code1) == (3, 3) and err1 == "" and not group0 and not group1
    assert err0.startswith("pretrain.py: stopped: step ") and err0.count("\n") == 1, err0


def test_stop_after_and_ctrl_c_say_where_to_continue(tmp_path, stdlib_data, capsys):
    """--stop-after ends with one line naming the step to continue from; the records carry the time
    and the run's elapsed seconds, which go on across a resume. Ctrl-C (SIGINT to the job) is one
    line on stderr, exit 130, no traceback, and the rerun resumes from the last checkpoint."""
    run(tmp_path, "--max-steps", "6", "--save-every", "2", "--stop-after", "3")
    assert "stopped at step 3 (--stop-after 3); rerun the same command to continue from step 3" in \
        capsys.readouterr().out
    run(tmp_path, "--max-steps", "6", "--save-every", "2")
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time"] > 1.7e9 for r in records)
    elapsed = [r["elapsed"] for r in records]
    # one clock across both invocations
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0, elapsed

    cmd = [sys.executable, "pretrain.py", *FAST, "--max-steps", "100000", "--save-every", "2",
           "--out", str(tmp_path / "int")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # interrupted once a step past the first checkpoint has been logged
        if line.startswith("step     3 |"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"stopped by Ctrl-C at step \d+; rerun the same "
                                            r"command to continue from step \d+", lines[0]), err
    assert "Traceback" not in err
    resume_from = int(lines[0].rsplit(" ", 1)[1])
    again = run(tmp_path, "--max-steps", "100000", "--save-every", "2", "--stop-after", "1",
                name="int")
    assert resume_from >= 2 and again["step"] == resume_from + 1
