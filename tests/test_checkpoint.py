"""Layout-free checkpoints: save under one layout, resume under another, continue. float64 on CPU:
the losses after the resume equal those of the run that went on in its original layout (and those of
one process), and the optimizer's state read back equals the saved one exactly. Then: completeness,
damage, fallback, failed saves."""
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import checkpoint
import lora
import moe
import pretrain
import stack
import training
import weights
from model import PRESETS, config_dict
from tests.distributed import run_distributed
from topology import Topology

CFG = replace(PRESETS["tiny"], n_layer=4, d_model=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=64,
              block_size=16)
B, SAVE_AT, STEPS = 8, 2, 4  # 8 sequences per step; save after step 2, go on to step 4


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    seq = torch.randint(0, CFG.vocab_size, (B, CFG.block_size + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def build(topo, zero=0, amp="fp32", experts=0, lora_targets=None):
    flags = ["--zero", str(zero), "--lr", "1e-2", "--bucket-mb", "0.01", "--amp", amp]
    if experts:
        flags += ["--experts", str(experts), "--topk", "2", "--ep", str(topo.ep)]
    cfg = pretrain.parse(flags)
    dtype = torch.float64 if amp == "fp32" else torch.float16
    adapt = ((lambda m: lora.apply_lora(m, r=2, targets=lora_targets))  # noqa: E731
             if lora_targets else None)
    model = stack.build_model(CFG, topo, seed=0, device=torch.device("cpu"), dtype=dtype,
                              experts=cfg.moe, adapt=adapt)
    module, opt = stack.build_training(model, cfg, dtype, topo)
    return model, module, opt


def run(topo, steps, model, module, opt, micro=1):
    """Steps [first, last) of the global batches; each dp rank its contiguous share, cut into
    `micro` pieces."""
    losses = []
    for step in steps:
        x, y = (t.chunk(topo.dp)[topo.dp_rank] for t in batch(step))
        loss = training.forward_backward(model if topo.pp > 1 else module,
                                         list(zip(x.chunk(micro), y.chunk(micro))),
                                         topo, "1f1b", opt.scale_loss, "cpu", opt.no_sync)
        if topo.ep > 1:
            moe.reduce_expert_grads(model, topo.dp, topo.expert_dp_group)
        opt.step(1.0)
        opt.zero_grad()
        losses.append(training.mean_over_dp(loss, topo).item())
    return losses


def save_and_go_on(out, topo, zero=0, amp="fp32", experts=0, micro=1, scale=None,
                   lora_targets=None):
    """Train to SAVE_AT, save, train on to STEPS: the losses after the save, in the same layout."""
    model, module, opt = build(topo, zero, amp, experts, lora_targets)
    run(topo, range(SAVE_AT), model, module, opt, micro)
    # a loss scale and a count of clean steps that are not the defaults: they must come back
    if scale:
        opt.scaler.scale, opt.scaler.good_steps = scale
    checkpoint.save(out, SAVE_AT, model, opt, topo, {"data": {"step": SAVE_AT}})
    return run(topo, range(SAVE_AT, STEPS), model, module, opt, micro)


def resume_and_go_on(src, out, topo, zero=0, amp="fp32", experts=0, micro=1, lora_targets=None):
    """Build the new layout, load, save again at once (to compare the states), train on to STEPS."""
    model, module, opt = build(topo, zero, amp, experts, lora_targets)
    meta = checkpoint.load(src, model, opt, topo)
    scaler = dict(opt.scaler.state_dict())
    checkpoint.save(out, meta["step"], model, opt, topo, {"data": meta["data"]})
    return run(topo, range(SAVE_AT, STEPS), model, module, opt, micro), scaler


def _world4(rank, world, tmp):
    tmp = Path(tmp)
    a = save_and_go_on(tmp / "z3tp2", Topology(tp=2), zero=3)
    b = resume_and_go_on(tmp / "z3tp2", tmp / "z3tp2-to-tp2pp2", Topology(tp=2, pp=2), micro=2)[0]
    c = save_and_go_on(tmp / "z2dp4", Topology(), zero=2)
    # Experts split by tp (their own names: blocks.i.mlp.experts.j) and over 2 ep ranks, then 1.
    m = save_and_go_on(tmp / "ep2tp2", Topology(tp=2, ep=2), zero=1, experts=4)
    m1 = resume_and_go_on(tmp / "ep2tp2", tmp / "ep2tp2-to-tp2", Topology(tp=2), zero=1,
                          experts=4)[0]
    # LoRA over tensor-parallel layers (A whole and B split for wq and w1, A split and B whole for
    # wo and w2).
    n = save_and_go_on(tmp / "lora-z1tp2", Topology(tp=2), zero=1, lora_targets="wq,wo,w1,w2")
    return a, b, c, m, m1, n


def _world2(rank, world, tmp):
    tmp = Path(tmp)
    d = save_and_go_on(tmp / "z3dp2", Topology(), zero=3)
    e = save_and_go_on(tmp / "ep2", Topology(ep=2), zero=1, experts=4)
    # (the balancing loss is a function of each rank's batch: ep 1 on as many data-parallel ranks
    # trains alike)
    e1 = resume_and_go_on(tmp / "ep2", tmp / "ep2-to-ep1", Topology(), zero=1, experts=4)[0]
    f = resume_and_go_on(tmp / "one", tmp / "one-to-z1dp2", Topology(), zero=1)[0]
    g = resume_and_go_on(tmp / "z2dp4", tmp / "z2dp4-to-z3dp2", Topology(), zero=3)[0]
    h = resume_and_go_on(tmp / "fp16-one", tmp / "fp16-to-z2dp2", Topology(), zero=2, amp="fp16")[1]
    # Context parallelism: the 2 cp ranks hold the same weights; only the first writes them.
    cp = Topology(cp=2)
    model, _, opt = build(cp)
    checkpoint.save(tmp / "cp2", 0, model, opt, cp, {"data": {"step": 0}})
    return d, e, e1, f, g, h


def same_state(a, b):
    """Every kind of every parameter, assembled whole from two step folders, bit for bit."""
    da, db = checkpoint.complete_steps(a)[0], checkpoint.complete_steps(b)[0]
    ma, mb = checkpoint.read_meta(da), checkpoint.read_meta(db)
    for kinds in (["param"], ["master"], ["exp_avg"], ["exp_avg_sq"]):
        sa, sb = weights.full_state_dict(da, ma, kinds), weights.full_state_dict(db, mb, kinds)
        assert sa.keys() == sb.keys() and (sa or kinds == ["master"]), kinds
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (kinds, name)
    steps = [{r["name"]: r["adam_step"] for f in m["files"] for r in f["pieces"] if r["adam_step"]}
             for m in (ma, mb)]
    assert steps[0] == steps[1] and set(steps[0].values()) == {float(SAVE_AT)}


def test_resume_on_another_layout(tmp_path):
    one = Topology()
    # one process: the losses every dense layout must reproduce
    ref = save_and_go_on(tmp_path / "one", one)
    save_and_go_on(tmp_path / "fp16-one", one, amp="fp16", scale=(1024.0, 7))
    a, b, c, m, m1, n = run_distributed(_world4, 4, str(tmp_path))[0]
    n1 = resume_and_go_on(tmp_path / "lora-z1tp2", tmp_path / "lora-to-one", one,
                          lora_targets="wq,wo,w1,w2")[0]
    d, e, e1, f, g, h = run_distributed(_world2, 2, str(tmp_path))[0]
    d1 = resume_and_go_on(tmp_path / "z3dp2", tmp_path / "z3dp2-to-one", one)[0]
    fresh, _, opt = build(one)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    # (a duplicate piece would make a value count twice)
    checkpoint.load(tmp_path / "cp2", fresh, opt, one)
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), build(one)[0].parameters()))
    # float64, the same arithmetic up to summation order (tp's partial sums, ZeRO's norms): 1e-10.
    close = lambda x, y: x == pytest.approx(y, rel=1e-10)  # noqa: E731
    # the original layouts agree with one process
    assert all(close(x, ref) for x in (a, c, d)), (ref, a, c, d)
    resumed = {"tp2pp2": (b, a), "z3dp2": (g, c), "z1dp2": (f, ref), "one": (d1, d), "ep1": (e1, e),
               "tp2": (m1, m), "lora-one": (n1, n)}
    assert all(close(*pair) for pair in resumed.values()), resumed
    assert h == {"scale": 1024.0, "good_steps": 7}  # the fp16 loss scale, carried over
    for src, dst in [("z3tp2", "z3tp2-to-tp2pp2"), ("z2dp4", "z2dp4-to-z3dp2"),
                     ("one", "one-to-z1dp2"), ("z3dp2", "z3dp2-to-one"), ("ep2", "ep2-to-ep1"),
                     ("ep2tp2", "ep2tp2-to-tp2"), ("fp16-one", "fp16-to-z2dp2"),
                     ("lora-z1tp2", "lora-to-one")]:
        same_state(tmp_path / src, tmp_path / dst)
    # What was saved is the model: the tp-sliced, ZeRO-sharded weights assembled are one process's.
    whole = {}
    for layout in ("one", "z3tp2", "z2dp4", "z3dp2"):
        d = checkpoint.complete_steps(tmp_path / layout)[0]
        whole[layout] = weights.full_state_dict(d, checkpoint.read_meta(d))
    for layout in ("z3tp2", "z2dp4", "z3dp2"):
        assert whole[layout].keys() == whole["one"].keys()
        for name, w in whole[layout].items():
            torch.testing.assert_close(w, whole["one"][name], rtol=1e-10, atol=1e-12,
                                       msg=f"{layout} {name}")


def test_a_step_is_complete_or_ignored_and_damage_falls_back(tmp_path, capsys, monkeypatch):
    one, out = Topology(), tmp_path / "run"
    model, module, opt = build(one)
    for step in (1, 2, 3):
        run(one, [step - 1], model, module, opt)
        checkpoint.save(out, step, model, opt, one, {"data": {"step": step}})
    # the last two
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_000002", "step_000003"]
    fresh = lambda: build(one)  # noqa: E731

    # A save killed between two ranks' writes leaves a .tmp folder with only some ranks' files.
    (out / "step_000004.tmp").mkdir()
    shutil.copy(out / "step_000003" / "rank0.pt", out / "step_000004.tmp" / "rank0.pt")
    m, _, o = fresh()
    assert checkpoint.load(out, m, o, one)["step"] == 3
    # Flipped bytes inside the newest step (same size): detected, and the previous step is taken,
    # with a warning.
    f = out / "step_000003" / "rank0.pt"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 8] = bytes(8)
    f.write_bytes(bytes(raw))
    m, _, o = fresh()
    capsys.readouterr()
    assert checkpoint.load(out, m, o, one)["step"] == 2
    warning = capsys.readouterr().err
    assert f"{f} is damaged" in warning and "step_000002" in warning and warning.count("\n") == 1
    # A truncated file in the only other step: one line naming the file.
    g = out / "step_000002" / "rank0.pt"
    g.write_bytes(g.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match=f"{f} is damaged"):
        checkpoint.load(out, *fresh()[::2], one)
    # (sizes only)
    assert checkpoint.find(out)[0] == out / "step_000003" and checkpoint.find(out)[2] == []
    (out / "step_000003" / "rank0.pt").unlink()
    d, _, skipped = checkpoint.find(out)
    assert d is None and skipped[0] == f"{f} is missing" \
        and skipped[1].startswith(f"{g} is truncated (")

    # The next save removes the stale .tmp folder and what is older than the last two steps.
    checkpoint.save(out, 4, model, opt, one, {"data": {"step": 4}})
    checkpoint.save(out, 5, model, opt, one, {"data": {"step": 5}})
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_000004", "step_000005"]


def _damaged_on_one_rank(rank, world, tmp):
    """Two ranks save steps 1 and 2 (ZeRO-1: each writes its own shard), rank 1's file of step 2
    gets a flipped byte; every rank resumes from step 1 (only rank 1 checks that file: the verdict
    is gathered), with the weights of step 1."""
    import contextlib
    import io
    out, dp2 = Path(tmp) / "dp2", Topology()
    model, module, opt = build(dp2, zero=1)
    for step in (1, 2):
        run(dp2, [step - 1], model, module, opt)
        checkpoint.save(out, step, model, opt, dp2, {"data": {"step": step}})
        if step == 1:
            at_1 = [p.detach().clone() for p in model.parameters()]
    if rank == 0:
        f = out / "step_000002" / "rank1.pt"
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 1
        f.write_bytes(bytes(raw))
    torch.distributed.barrier()
    fresh, _, o = build(dp2, zero=1)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        step = checkpoint.load(out, fresh, o, dp2)["step"]
    return step, err.getvalue(), all(torch.equal(p, q) for p, q in zip(fresh.parameters(), at_1))


def test_a_step_damaged_on_one_rank_falls_back_on_every_rank(tmp_path):
    (s0, err0, same0), (s1, err1, same1) = run_distributed(_damaged_on_one_rank, 2, str(tmp_path))
    assert (s0, s1) == (1, 1) and same0 and same1 and err1 == ""
    assert err0 == (f"warning: resuming from step 1 ({tmp_path / 'dp2' / 'step_000001'}), the "
                    f"newest undamaged one: {tmp_path / 'dp2' / 'step_000002' / 'rank1.pt'} is "
                    "damaged (its CRC-32 differs from the one written)\n")


@pytest.mark.parametrize("errno, cause", [(28, "No space left on device"),
                                          (13, "Permission denied")])
def test_a_failed_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                  errno, cause):
    one, out = Topology(), tmp_path / "run"
    model, module, opt = build(one)
    checkpoint.save(out, 1, model, opt, one, {"data": {"step": 1}})

    def failing_open(path, *a, **k):
        raise OSError(errno, cause, str(path))
    monkeypatch.setattr(checkpoint, "open", failing_open, raising=False)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save(out, 2, model, opt, one, {"data": {"step": 2}})
    assert str(e.value) == (f"could not save step 2: {out}/step_000002.tmp/rank0.pt: {cause}; "
                            f"the last complete checkpoint, {out}/step_000001, is kept")
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_000001"]


def test_metrics_keep_one_history_and_fresh_moves_the_run_aside(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": 1}}\n' for s in range(7)))
    checkpoint.truncate_metrics(out / "metrics.jsonl", 4)
    assert [l for l in (out / "metrics.jsonl").read_text().splitlines()][-1] == \
        '{"step": 4, "loss": 1}'
    assert checkpoint.move_aside(out) == tmp_path / "run.1" and not out.exists()
    out.mkdir()
    assert checkpoint.move_aside(out) == tmp_path / "run.2"


def test_start_or_resume_decides_before_any_work(tmp_path, capsys):
    one, out = Topology(), tmp_path / "run"
    same = {"model_config": {"n_layer": 4, "d_model": 32}, "batch_size": 8, "lr": 0.01}
    assert checkpoint.find_resume(out) is None  # nothing there: start
    with pytest.raises(checkpoint.CheckpointError, match="--resume: no complete checkpoint in"):
        checkpoint.find_resume(out, resume=True)
    model, module, opt = build(one)
    checkpoint.save(out, 3, model, opt, one, {"data": {"step": 3}, "identity": same})
    d, meta = checkpoint.find_resume(out)
    assert d == out / "step_000003" and checkpoint.check_same_run(out, meta, same) is None
    for change, message in [({"batch_size": 16}, "--batch-size 8, not 16 (the data position"),
                            ({"lr": 0.02}, "holds another run (--lr 0.01, not 0.02): resume with "
                                           "the same settings"),
                            ({"model_config": {"n_layer": 6, "d_model": 32}},
                             "model config n_layer 4, not 6")]:
        with pytest.raises(checkpoint.CheckpointError, match=re.escape(message)):
            checkpoint.check_same_run(out, meta, same | change)
    assert checkpoint.find_resume(out, fresh=True) is None
    assert "moved to" in capsys.readouterr().out \
        and (tmp_path / "run.1" / "step_000003").is_dir() and not out.exists()


def test_consolidate_and_export_from_the_command_line(tmp_path, capsys):
    one, out = Topology(), tmp_path / "run"
    model, module, opt = build(one)
    cfg = config_dict(replace(CFG, attn="-"))  # as checkpoints record it
    checkpoint.save(out, 1, model, opt, one, {"data": {"step": 1}, "model_config": cfg,
                                              "tokenizer": "bytes"})
    weights.main(["consolidate", str(out), str(tmp_path / "model.pt")])
    weights.main(["export-hf", str(out), str(tmp_path / "hf")])
    # what --init accepts
    for source in (out, out / "step_000001", tmp_path / "model.pt", tmp_path / "hf"):
        init = weights.load_weights(source)
        sd, config, tokenizer = init["model"], init["model_config"], init["tokenizer"]
        assert config == cfg and tokenizer == "bytes" and sd.keys() == model.state_dict().keys()
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items()), source
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        weights.main(["consolidate", str(tmp_path / "nothing"), str(tmp_path / "x.pt")])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("checkpoint.py: error: no complete checkpoint in "
                                       f"{tmp_path / 'nothing'}\n")


def test_an_old_format_folder_is_not_silently_restarted(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"format 1")
    with pytest.raises(checkpoint.CheckpointError, match="ckpt.pt is of format 1.*give --fresh"):
        checkpoint.find_resume(tmp_path)
