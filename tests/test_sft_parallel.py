"""sft.py on 2 data-parallel gloo ranks (ddp.py, ZeRO-2 with LoRA) against one process on the same global batch."""
import pytest
import torch

import sft
import checkpoint
from sft_fixtures import make_init, reverse_examples, write_jsonl
from tests.distributed import run_distributed


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftdp")
    # Long and short responses mixed, so that the ranks' micro-batches hold different numbers of response
    # tokens: a per-rank mean would then differ from the step's token mean, and the test would see it.
    rows = reverse_examples(40) + [{"instruction": "Say x.", "output": "x" * n} for n in (3, 30, 9, 45, 1, 20)] * 4
    return {"init": make_init(d / "init"), "train": write_jsonl(d / "train.jsonl", rows),
            "val": write_jsonl(d / "val.jsonl", reverse_examples(10, seed=1)), "dir": d}


def argv(files, out, extra):
    return ["--init", str(files["init"]), "--data", str(files["train"]), "--val-data", str(files["val"]),
            "--out", str(out), "--batch-size", "8", "--grad-accum", "2", "--lr", "1e-2", "--warmup-steps", "1",
            "--max-steps", "4", "--eval-every", "2", "--samples", "0", "--log-every", "1", *extra]


def trainable(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def sft_rank(rank, world, files, out, extra):
    res = sft.main(argv(files, out, extra))
    return res["losses"], res["val_losses"], trainable(res["model"])


@pytest.mark.parametrize("extra", [["--zero", "0"], ["--zero", "2", "--lora-r", "4", "--lora-targets", "wq,wv,w2"]],
                         ids=["ddp", "zero2-lora"])
def test_data_parallel_sft_matches_one_process(tmp_path, files, extra):
    """Losses (train and held-out) and the trained parameters agree with one process to fp32 rounding: the
    summation order differs (two ranks' partial sums, then an all-reduce), nothing else does."""
    one = sft.main(argv(files, tmp_path / "one", extra))
    ranks = run_distributed(sft_rank, 2, files, tmp_path / "two", extra)
    ref = trainable(one["model"])
    for losses, val_losses, params in ranks:
        assert losses == pytest.approx(one["losses"], rel=1e-5)
        assert val_losses == pytest.approx(one["val_losses"], rel=1e-5)
        assert params.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(params[k], ref[k], rtol=1e-4, atol=1e-6)
    if "--lora-r" in extra:
        assert all(".lora_" in k for k in ref)
        assert (tmp_path / "two" / "adapter.pt").exists()
        assert (checkpoint.find(tmp_path / "two")[0] / "rank1.pt").exists()
