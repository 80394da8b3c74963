"""Every flag and input a user can get wrong: one line naming it and what would be valid, exit
status 2, before any work starts (no training step, no process group, no file written)."""
import json

import pytest

import pretrain
import sft
from sft_fixtures import make_init, reverse_examples, write_jsonl

# (--stop-after 1: were a check missing, the test would fail after one step, not after a whole run)
FAST = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--stop-after", "1",
        "--eval-iters", "1", "--sample-tokens", "0"]

PRETRAIN_FLAGS = [  # (flags, what the one line must say)
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "0"], "--lr must be > 0, got 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--aux-loss-weight", "nan", "--experts", "4"], "--aux-loss-weight must be a finite number"),
    (["--capacity-factor", "nan", "--experts", "4"], "--capacity-factor must be a finite number"),
    (["--min-lr", "-5"], "--min-lr must be between 0 and --lr 0.001"),
    (["--min-lr", "0.01"], "--min-lr must be between 0 and --lr 0.001"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--tokens", "0"], "--tokens must be at least 1"),
    (["--tokens", "-1"], "--tokens must be at least 1"),
    (["--tokens", "nan"], "--tokens must be a finite number"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number, got nan"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    (["--beta1", "2"], "--beta1 must be in [0, 1), got 2"),
    (["--beta2", "1"], "--beta2 must be in [0, 1), got 1"),
    (["--beta1", "-0.5"], "--beta1 must be in [0, 1)"),
    (["--seed", "-1"], "--seed must be in [0, 2^63), got -1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--sample-tokens", "-1"], "--sample-tokens must be >= 0"),
    (["--bucket-mb", "nan"], "--bucket-mb must be a finite number"),
    (["--estimate", "--gpus", "0"], "--gpus must be at least 1"),
    (["--estimate", "--mfu", "nan"], "--mfu must be a finite number"),
    (["--estimate", "--mfu", "1.5"], "--mfu must be in (0, 1]"),
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
]


def one_line_error(capsys, main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, (e.value.code, err)
    return err


@pytest.mark.parametrize("flags,message", PRETRAIN_FLAGS,
                         ids=[" ".join(f) for f, _ in PRETRAIN_FLAGS])
def test_pretrain_refuses_a_bad_flag_in_one_line(tmp_path, capsys, flags, message):
    err = one_line_error(capsys, pretrain.main, FAST + ["--out", str(tmp_path / "o")] + flags)
    assert message in err, err
    assert not (tmp_path / "o").exists()  # before any work: not even the output folder


def test_out_must_not_be_empty(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (were it accepted, the run would write its steps here)
    assert "--out is empty: give a folder" in one_line_error(capsys, pretrain.main,
                                                             FAST + ["--out", ""])
    assert list(tmp_path.iterdir()) == []


def test_out_must_be_a_folder_that_can_be_made(tmp_path, capsys):
    (tmp_path / "f").write_text("a file")
    assert "--out {} is a file".format(tmp_path / "f") in one_line_error(
        capsys, pretrain.main, FAST + ["--out", str(tmp_path / "f")])
    assert "is a file, so the folder cannot be made" in one_line_error(
        capsys, pretrain.main, FAST + ["--out", str(tmp_path / "f" / "run")])


def test_a_damaged_data_folder_is_refused_by_the_entry_point(tmp_path, capsys, stdlib_data):
    """data.py's checks (tests/test_data.py: every case) reach the user as one pretrain.py line."""
    d = tmp_path / "d"
    d.mkdir()
    meta = json.loads((stdlib_data / "meta.json").read_text())
    for name in meta["shards"]["train"] + meta["shards"]["val"]:
        (d / name).symlink_to(stdlib_data / name)
    (d / "meta.json").write_text(json.dumps({**meta, "dtype": "uint8"}))
    err = one_line_error(capsys, pretrain.main,
                         FAST + ["--out", str(tmp_path / "o"), "--data", str(d)])
    assert "dtype 'uint8' is not a shard dtype: uint16 or uint32" in err
    (d / "meta.json").write_text(json.dumps({**meta, "vocab_size": 200}))
    err = one_line_error(capsys, pretrain.main,
                         FAST + ["--out", str(tmp_path / "o"), "--data", str(d)])
    assert "token ids up to 256 (max_id, eot) do not fit vocab_size 200" in err


SFT_FLAGS = [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--beta2", "2"], "--beta2 must be in [0, 1), got 2"),
    (["--min-lr", "-1"], "--min-lr must be between 0 and --lr"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number, got inf"),
    (["--seed", "-1"], "--seed must be in [0, 2^63)"),
    (["--lora-r", "8", "--lora-alpha", "nan"], "--lora-alpha must be a finite number, got nan"),
    (["--lora-r", "8", "--lora-dropout", "inf"], "--lora-dropout must be a finite number, got inf"),
]


@pytest.mark.parametrize("flags,message", SFT_FLAGS, ids=[" ".join(f) for f, _ in SFT_FLAGS])
def test_sft_refuses_a_bad_flag_in_one_line(tmp_path, capsys, flags, message):
    err = one_line_error(capsys, sft.main,
                         ["--init", str(tmp_path / "none"), "--out", str(tmp_path / "o")] + flags)
    assert message in err, err


def test_sft_names_the_line_with_a_byte_that_is_not_utf8(tmp_path, capsys):
    init = make_init(tmp_path / "init")
    data = write_jsonl(tmp_path / "train.jsonl", reverse_examples(12))
    with open(data, "ab") as f:
        f.write(b'{"instruction": "caf\xe9", "output": "x"}\n')
    err = one_line_error(capsys, sft.main,
                         ["--init", str(init), "--data", str(data), "--out", str(tmp_path / "o")])
    assert f"{data}:13: byte 0xe9 at column 21 is not UTF-8" in err
