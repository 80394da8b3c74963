"""scaling.py: the fits recover known exponents from synthetic data; a 3-run micro-sweep trains,
records its results and resumes where it stopped."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest

import model
import scaling

TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}  # Chinchilla's fitted law


def law(N, D, p=TRUE):
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def test_parametric_fit_recovers_known_exponents():
    rng = np.random.default_rng(0)
    N = 10 ** rng.uniform(7, 10, 40)
    D = 10 ** rng.uniform(9, 12, 40)
    loss = law(N, D) * np.exp(rng.normal(0, 1e-3, 40))  # 0.1% noise
    fit = scaling.fit_parametric(N, D, loss)
    for k in ("alpha", "beta", "E"):
        assert fit[k] == pytest.approx(TRUE[k], rel=0.05), (k, fit)


def test_isoflop_profiles_recover_the_optimal_size_exponent(capsys):
    # Chinchilla's law implies N_opt ~ C^(beta / (alpha + beta)); approach 2 must find it from
    # profiles alone.
    results = []
    for C in (1e18, 1e19, 1e20, 1e21):
        n_center = 0.6 * (C / 6) ** (0.28 / 0.62)
        for N in n_center * np.geomspace(1 / 8, 8, 9):
            D = C / (6 * N)
            results.append({"budget": C, "N": N, "D": D, "val_loss": law(N, D)})
    a, _, optima = scaling.approach2(results)
    assert len(optima) == 4
    assert a == pytest.approx(0.28 / 0.62, rel=0.05)
    # The whole report (plot, both approaches, bootstraps), also where a resample leaves one budget.
    fitted = scaling.report([dict(r, flops=r["budget"]) for r in results])
    assert fitted["a"] == a and fitted["parametric"]["alpha"] == pytest.approx(0.34, rel=0.05)
    assert "N_opt ~ C^a" in capsys.readouterr().out
    # 9 + 3 runs: resamples often lack a profile
    two = [r for r in results if r["budget"] in (1e18, 1e19)][:12]
    assert scaling.bootstrap(two, lambda rs: {"a": scaling.approach2(rs)[0]}, n=20)["a"] >= 0


def test_micro_sweep_trains_records_and_resumes(tmp_path, stdlib_data, capsys):
    runs = scaling.plan([1.5e9], ladder=[(1, 16), (1, 24), (1, 32)], tokens_per_param=(0, math.inf),
                        min_steps=1)
    assert len(runs) == 3 and all(r["steps"] >= 3 for r in runs)
    scaling.sweep(runs[:2], tmp_path, lr=3e-3, threads=1)  # "interrupted" after two runs
    first = (tmp_path / "runs.jsonl").read_text()
    scaling.sweep(runs, tmp_path, lr=3e-3, threads=1)      # run again: only the third trains
    assert "3 runs (2 done)" in capsys.readouterr().out
    lines = (tmp_path / "runs.jsonl").read_text()
    assert lines.startswith(first)
    recs = [json.loads(l) for l in lines.splitlines()]
    assert [r["key"] for r in recs] == [r["key"] for r in runs]
    # each trained for its budget's tokens, and learnt something (bytes start at ln 256 = 5.5)
    for r in recs:
        assert r["D"] == r["steps"] * scaling.SEQ_LEN * scaling.BATCH and r["flops"] <= 1.5e9 * 1.5
        assert 0 < r["val_loss"] < math.log(256)


def test_a_run_is_a_call_of_the_training_loop_that_resumes(tmp_path, stdlib_data):
    """scaling.train runs training.py's loop on a config, in this process: stopped half-way
    (stop_after) and called again, it goes on from its checkpoint and ends where an uninterrupted
    run ends, bit for bit (fp32, one process). The shape is passed, never registered as a preset."""
    presets = dict(model.PRESETS)
    run = scaling.plan([1.5e9], ladder=[(1, 16)], tokens_per_param=(0, math.inf), min_steps=1)[0]
    shape = scaling.shape(1, 16)
    whole = scaling.train(scaling.config_for(run, tmp_path / "whole", 3e-3), shape)
    cfg = scaling.config_for(run, tmp_path / "halves", 3e-3)
    half = replace(cfg, settings=replace(cfg.settings, stop_after=run["steps"] // 2))
    first = scaling.train(half, shape)
    second = scaling.train(cfg, shape)
    assert whole.step == second.step == run["steps"] and first.step == run["steps"] // 2
    assert first.losses + second.losses == whole.losses
    assert second.val_losses[-1] == whole.val_losses[-1]
    assert model.PRESETS == presets
