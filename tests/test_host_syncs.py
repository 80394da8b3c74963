"""Host reads per training step: every .item(), .tolist(), float(), int(), bool(), .cpu() or
.numpy() of a tensor computed on the GPU makes the host wait until the GPU has finished everything
queued, so the next kernels start late. A steady-state step (after the first, without a log, eval or
save) of pretrain.py's loop makes none, in fp32, bf16 and fp16 (whose loss scale adapts on the
device). Not here: MoE layers read their routed row counts once per layer (moe.py), and the pipeline
reads the labelled count once per step.

On the CPU the calls are counted, whatever the tensor's device; on a GPU,
torch.cuda.set_sync_debug_mode("error") would also catch the reads inside torch's own operations."""
import json

import pytest
import torch

import pretrain
import training

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


def count_reads_per_step(monkeypatch, argv):
    """{step: host reads from the start of that step to the next one's} over a pretrain.py run."""
    reads, per_step = [0], {}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **kw):
            reads[0] += 1
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_step = training.train_step

    def step(run):
        if run.step:
            per_step[run.step] = reads[0]  # the previous step's iteration of the loop ends here
        reads[0] = 0
        return real_step(run)
    monkeypatch.setattr(training, "train_step", step)
    pretrain.main(argv)
    return per_step


@pytest.mark.parametrize("amp", ["fp32", "bf16", "fp16"])
def test_a_steady_state_step_reads_nothing_back_from_the_device(monkeypatch, tmp_path,
                                                                stdlib_data, amp):
    argv = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2",
            "--max-steps", "8", "--warmup-steps", "2", "--log-every", "4", "--eval-every", "100",
            "--save-every", "100", "--eval-iters", "1", "--sample-tokens", "0", "--amp", amp,
            "--out", str(tmp_path / "run")]
    per_step = count_reads_per_step(monkeypatch, argv)
    # not the first, not a log step (4, 8)
    steady = {s: n for s, n in per_step.items() if s % 4 and s > 1}
    assert list(steady) == [2, 3, 5, 6, 7]
    assert all(n == 0 for n in steady.values()), f"{amp}: host reads per step {per_step}"
    assert per_step[4] > 0  # a log step reads (the counting works)


def stop_step(tmp_path, capsys, name, *extra):
    """fp16 at --lr 1 (it overflows within a few steps): its "stopped" record's step and reason."""
    argv = ["--model", "tiny", "--seq-len", "16", "--batch-size", "2", "--lr", "1", "--amp", "fp16",
            "--max-steps", "200", "--warmup-steps", "2", "--eval-iters", "1", "--sample-tokens",
            "0", "--out", str(tmp_path / name), *extra]
    with pytest.raises(SystemExit) as e:
        pretrain.main(argv)
    assert e.value.code == 3, capsys.readouterr().err
    stop = [r for r in map(json.loads,
                           (tmp_path / name / "metrics.jsonl").read_text().splitlines())][-1]
    return stop["step"], stop["stopped"]


def test_a_diverging_run_stops_at_the_next_read_with_the_step_counts_of_every_step(
        tmp_path, capsys, stdlib_data):
    """Read only at log steps, the guard still sees every step in order: it stops at the first log
    step at or after the 8th bad step in a row, which it names as when each step was read."""
    every, reason = stop_step(tmp_path, capsys, "every", "--log-every", "1")
    # a log interval that the 8th bad step does not end
    k = next(k for k in (4, 3, 5, 7) if every % k)
    deferred, deferred_reason = stop_step(tmp_path, capsys, "deferred", "--log-every", str(k))
    assert (deferred == -(-every // k) * k > every and deferred_reason == reason
            and "8 steps in a row" in reason)
