"""Nothing lost, nothing run that should not be. Every entry point that reads a .pt file loads it
with weights_only=True: a file made to run code when unpickled runs none and is refused in one line.
A damaged newest step (a flipped byte, a truncated or missing rank file, a garbled or edited
meta.json) is passed over by the rerun of the same command line, which resumes bit for bit from the
previous step after one warning line naming it and the reason. The RNG states are tensors and plain
values, and only this rank's own CUDA device's is kept."""
import os
import random
import shutil
import zlib

import numpy as np
import pytest
import torch

import checkpoint
import int8_eval
import pretrain
import sft
import training
import weights
from sft_fixtures import make_init, reverse_examples, write_jsonl

FAST = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--eval-iters", "1",
        "--sample-tokens", "0", "--tokenizer", "bytes", "--warmup-steps", "1", "--save-every", "1",
        "--max-steps", "3"]


class Payload:
    """Unpickling this calls os.mkdir(marker), where a malicious .pt file could do anything."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stdlib_data):
    """A pretraining run stopped at step 2 of 3 (steps 1 and 2 on disk, its losses), an SFT LoRA run
    to its end (adapter.pt, merged.pt), the base model file it started from, and its data."""
    root = tmp_path_factory.mktemp("runs")
    first = pretrain.main(FAST + ["--stop-after", "2", "--out", str(root / "pre")])
    init = make_init(root / "init")
    data = write_jsonl(root / "train.jsonl", reverse_examples(24))
    sft_argv = ["--init", str(init), "--data", str(data), "--batch-size", "4", "--max-steps", "2",
                "--save-every", "1", "--samples", "0", "--eval-examples", "4",
                "--warmup-steps", "1", "--lora-r", "2"]
    sft.main(sft_argv + ["--out", str(root / "sft")])
    return {"root": root, "pre": root / "pre", "losses": first["losses"], "sft": root / "sft",
            "init": init, "sft_argv": sft_argv}


def poison_steps(run, marker):
    """Every step's rank0.pt replaced by a pickle that runs code, its size and CRC-32 (and
    meta.json's own) made to match, as a forger would: only the loading itself stands between the
    file and the code."""
    for d in sorted(run.glob("step_*")):
        f = d / "rank0.pt"
        torch.save({"tensors": [], "rng": Payload(marker)}, f)
        meta = checkpoint.read_meta(d)
        meta["files"][0].update(size=f.stat().st_size, crc32=zlib.crc32(f.read_bytes()))
        checkpoint.write_meta(d, meta)
    return run


def poison_file(path, marker):
    torch.save({"model": Payload(marker), "model_config": {}, "tokenizer": "bytes",
                "lora_config": {}, "adapter": {}}, path)
    return path


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# (entry point, argv built from: runs, this test's folder, the marker)
ENTRY_POINTS = {
    "pretrain --init FILE": lambda r, t, m: (pretrain.main, FAST + [
        "--out", str(t / "o"), "--init", str(poison_file(t / "m.pt", m))]),
    "pretrain --init DIR": lambda r, t, m: (pretrain.main, FAST + [
        "--out", str(t / "o"), "--init", str(poison_steps(copy(r["pre"], t / "p"), m))]),
    "pretrain resume --out": lambda r, t, m: (pretrain.main, FAST + [
        "--out", str(poison_steps(copy(r["pre"], t / "p"), m))]),
    "sft --init FILE": lambda r, t, m: (sft.main, r["sft_argv"][2:] + [
        "--out", str(t / "o"), "--init", str(poison_file(t / "m.pt", m))]),
    "sft --init DIR": lambda r, t, m: (sft.main, r["sft_argv"][2:] + [
        "--out", str(t / "o"), "--init", str(poison_steps(copy(r["pre"], t / "p"), m))]),
    "sft --adapter": lambda r, t, m: (sft.main, r["sft_argv"][:-4] + [
        "--out", str(t / "o"), "--adapter", str(poison_file(t / "a.pt", m))]),
    "sft resume --out": lambda r, t, m: (sft.main, r["sft_argv"] + [
        "--out", str(poison_steps(copy(r["sft"], t / "s"), m))]),
    "checkpoint.py consolidate DIR": lambda r, t, m: (weights.main, [
        "consolidate", str(poison_steps(copy(r["pre"], t / "p"), m)), str(t / "c.pt")]),
    "checkpoint.py export-hf DIR": lambda r, t, m: (weights.main, [
        "export-hf", str(poison_steps(copy(r["pre"], t / "p"), m)), str(t / "hf")]),
    "checkpoint.py export-hf FILE": lambda r, t, m: (weights.main, [
        "export-hf", str(poison_file(t / "m.pt", m)), str(t / "hf")]),
    "int8_eval.py FILE": lambda r, t, m: (int8_eval.main, [str(poison_file(t / "m.pt", m))]),
    "int8_eval.py DIR": lambda r, t, m: (int8_eval.main, [
        str(poison_steps(copy(r["pre"], t / "p"), m))]),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_no_entry_point_runs_code_from_a_file(runs, tmp_path, capsys, entry):
    marker = tmp_path / "code-ran"
    main, argv = ENTRY_POINTS[entry](runs, tmp_path, marker)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), f"{entry}: loading ran the file's code"
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, (e.value.code, err)
    assert "pickled objects other than tensors and plain values" in err \
        and "could run code" in err, err


def flip_a_byte(d):
    f = d / "rank0.pt"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 1
    f.write_bytes(bytes(raw))


def edit_step(d, reseal):
    if reseal:  # (the checksum recomputed too: the folder's name still disagrees)
        checkpoint.write_meta(d, checkpoint.read_meta(d) | {"step": 30})
    else:  # (by hand: the text edited, the checksum in it left as it was)
        text = (d / "meta.json").read_text()
        (d / "meta.json").write_text(text.replace('"step": 2,', '"step": 30,'))


DAMAGE = {  # how step 2 is damaged, and what the warning must say of it
    "a flipped byte in rank0.pt": (flip_a_byte, "rank0.pt is damaged (its CRC-32 differs"),
    "rank0.pt truncated": (lambda d: (d / "rank0.pt").write_bytes(
        (d / "rank0.pt").read_bytes()[:500]), "rank0.pt is truncated"),
    "rank0.pt missing": (lambda d: (d / "rank0.pt").unlink(), "rank0.pt is missing"),
    "meta.json garbage": (lambda d: (d / "meta.json").write_text("{garbage"),
                          "meta.json: missing or not a"),
    "meta.json step edited": (lambda d: edit_step(d, False), "meta.json is damaged or was edited"),
    "meta.json step edited and resealed": (lambda d: edit_step(d, True),
                                           "meta.json says step 30, its folder step_000002"),
    "meta.json of an older version": (lambda d: (d / "meta.json").write_text(checkpoint.json.dumps(
        checkpoint.read_meta(d))), "meta.json has no CRC-32 of its own (an older version's)"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_newest_step_falls_back_through_pretrain(runs, tmp_path, capsys, case):
    """The rerun of the same command line resumes from step 1 with one warning line naming the step
    and the reason, and trains step 2 again to the loss the first run had (bit for bit: fp32, one
    process)."""
    out = copy(runs["pre"], tmp_path / "run")
    damage, reason = DAMAGE[case]
    damage(out / "step_000002")
    capsys.readouterr()
    again = pretrain.main(FAST + ["--stop-after", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: resuming from step 1 "
                                                   f"({out / 'step_000001'})"), err
    assert reason in err, err
    assert again["step"] == 2 and again["losses"] == runs["losses"][1:]
    assert checkpoint.find_resume(out)[1]["step"] == 2  # step 2 saved again, whole


def test_a_damaged_newest_step_falls_back_through_sft(runs, tmp_path, capsys):
    out = copy(runs["sft"], tmp_path / "run")
    flip_a_byte(out / "step_000002")
    capsys.readouterr()
    again = sft.main(runs["sft_argv"] + ["--out", str(out)])
    err = capsys.readouterr().err
    assert err.startswith(f"warning: resuming from step 1 ({out / 'step_000001'}), the newest "
                          f"undamaged one: {out / 'step_000002' / 'rank0.pt'} is damaged") \
        and err.count("\n") == 1, err
    assert again["step"] == 2 and len(again["losses"]) == 1


def test_a_checkpoint_with_pickled_numpy_objects_is_refused_with_a_hint(runs, tmp_path, capsys):
    """An older version's file (numpy's RNG state pickled as numpy objects): one line, unread."""
    out = copy(runs["pre"], tmp_path / "run")
    for d in sorted(out.glob("step_*")):
        f = d / "rank0.pt"
        saved = checkpoint.safe_load(f, mmap=False)
        torch.save(saved | {"rng": saved["rng"] | {"numpy": np.random.get_state()}}, f)
        meta = checkpoint.read_meta(d)
        meta["files"][0].update(size=f.stat().st_size, crc32=zlib.crc32(f.read_bytes()))
        checkpoint.write_meta(d, meta)
    with pytest.raises(SystemExit) as e:
        pretrain.main(FAST + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "holds pickled objects" in err \
        and "give --fresh" in err, err


def test_rng_states_round_trip_safely_and_keep_this_device_only(monkeypatch, tmp_path):
    """torch's, numpy's and Python's streams come back exactly through a weights_only file; of CUDA,
    only the current device's state is saved (get_rng_state, never get_rng_state_all) and restored,
    and a state saved with or without CUDA is restored on a machine with the other (more or fewer
    GPUs visible)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": torch.arange(8, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                        lambda: pytest.fail("every GPU's state saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda s: pytest.fail("every GPU's state restored"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.append(s))
    torch.manual_seed(1), np.random.seed(2), random.seed(3), random.gauss(0, 1)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    drawn = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)],
             random.gauss(0, 1))
    state = checkpoint.safe_load(tmp_path / "rng.pt")
    checkpoint.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)],
             random.gauss(0, 1))
    assert torch.equal(drawn[0], again[0]) and (drawn[1] == again[1]).all() \
        and drawn[2:] == again[2:]
    assert len(calls) == 1 and torch.equal(calls[0], torch.arange(8, dtype=torch.uint8))
    # saved on a CPU-only run: CUDA's stream left as it is
    checkpoint.set_rng_state(state | {"cuda": None})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checkpoint.set_rng_state(state)  # saved with CUDA, resumed without
    assert len(calls) == 1


def test_checkpoint_py_errors_are_one_line_from_the_command_line(runs, tmp_path):
    """Run as a script (checkpoint.py is then __main__, weights.py imports it as checkpoint: two
    CheckpointError classes): one line, exit 2. export-hf never writes into a folder that holds
    something."""
    import subprocess
    import sys
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    for argv, message in [(["consolidate", str(tmp_path / "nothing"), str(tmp_path / "m.pt")],
                           "checkpoint.py: error: no complete checkpoint in "
                           f"{tmp_path / 'nothing'}"),
                          (["export-hf", str(runs["pre"]), str(tmp_path / "hf")],
                           f"checkpoint.py: error: export-hf: {tmp_path / 'hf'} exists and is "
                           "not an empty folder")]:
        p = subprocess.run([sys.executable, "checkpoint.py", *argv], capture_output=True, text=True,
                           cwd=os.path.dirname(checkpoint.__file__))
        assert p.returncode == 2 and p.stderr.startswith(message) \
            and p.stderr.count("\n") == 1, p.stderr
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine" \
        and len(list((tmp_path / "hf").iterdir())) == 1


def test_a_consolidated_lora_run_is_the_merged_model(runs, tmp_path):
    """consolidate (and --init DIR) merge a LoRA run's adapters: the plain model sft.py's merged.pt
    holds, which --init takes."""
    weights.main(["consolidate", str(runs["sft"]), str(tmp_path / "c.pt")])
    ours, merged = (checkpoint.safe_load(tmp_path / "c.pt")["model"],
                    checkpoint.safe_load(runs["sft"] / "merged.pt"))
    assert ours.keys() == merged["model"].keys() and not any(".lora_" in k for k in ours)
    for k, v in merged["model"].items():  # (the same sum W + (alpha/r) B A: to rounding)
        torch.testing.assert_close(ours[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert sft.load_init(str(tmp_path / "c.pt"))["model"].keys() == ours.keys()
    assert sft.load_init(str(runs["sft"]))["model"].keys() == ours.keys()


def test_a_flag_that_changes_the_maths_is_part_of_the_run(runs, tmp_path, capsys):
    out = copy(runs["sft"], tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        sft.main(runs["sft_argv"] + ["--out", str(out), "--no-prompt-mask"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and ("holds another run (--no-prompt-mask False, "
                                                      "not True)") in err, err


def test_a_finished_run_goes_on_with_a_larger_max_steps(runs, tmp_path, capsys):
    """The run stopped at step 2 of 3 goes on to 5 with a line saying where the schedule changes;
    step 3's learning rate is that of a 5-step run's cosine, not a 3-step one's. A length below the
    step reached is refused."""
    out = copy(runs["pre"], tmp_path / "run")
    argv = [a for a in FAST if a != "3"][:-1]  # (without --max-steps 3)
    capsys.readouterr()
    again = pretrain.main(argv + ["--max-steps", "5", "--stop-after", "1", "--out", str(out)])
    said = capsys.readouterr().out
    assert (f"--max-steps 5: the run in {out} was planned for 3 steps; its learning-rate "
            "schedule changes from step 2 (the cosine decay now ends at step 5)") in said, said
    lr = [checkpoint.json.loads(l)["lr"] for l in (out / "metrics.jsonl").read_text().splitlines()
          if '"lr"' in l]
    optim = pretrain.parse(argv).optim
    assert again["step"] == 3
    assert lr[-1] == training.lr_at(2, optim, 5) != training.lr_at(2, optim, 3)
    with pytest.raises(SystemExit) as e:
        pretrain.main(argv + ["--max-steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.endswith(f"{out} holds a run at step 3: --max-steps 2 is "
                                              "below it; give at least 3, or --fresh (the old "
                                              "run is moved aside)"), err


def test_a_longer_run_keeps_the_warm_up_it_had(tmp_path, capsys):
    """Without --warmup-steps the warm-up is a tenth of the run: going from 10 to 1000 steps must
    not restart it (100 steps of warm-up at step 10)."""
    cfg = pretrain.parse(["--out", str(tmp_path)])
    ckpt = {"identity": {"max_steps": 10}, "step": 10, "args": {"warmup_steps": 1}}
    longer = training.change_length(cfg, ckpt, 1000)
    assert longer.optim.warmup_steps == 1
    assert "schedule changes from step 10" in capsys.readouterr().out
    assert cfg.optim.warmup_steps is None  # the config parsed is left as it was
