"""flash_kernels.py compiled for the H100 (sm_90a) without a GPU, by the ptxas that ships with
Triton (benchmarks/kernels.py): each kernel's first autotuning candidate for head dim 128, the
largest and the hardest to fit, keeps every value in registers (no spill to local memory) and its
shared memory within the SM's limit."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_kernel_fits_an_h100_without_spills(tmp_path):
    # what `make kernels` runs
    assert "\t$(PY) benchmarks/kernels.py\n" in open(os.path.join(ROOT, "Makefile")).read()
    # compiled, not interpreted
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # (kernels.py compiles afresh anyway)
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "benchmarks/kernels.py", "--arch", "90", "--head-dim",
                        "128", "--first", "--jobs", "2", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode == 3:  # no ptxas on this machine: nothing to compile with
        pytest.skip(r.stdout.strip())
    assert r.returncode in (0, 1), r.stdout + r.stderr
    rows = json.loads(out.read_text())
    assert sorted(row["kernel"] for row in rows) == ["dK/dV", "dQ", "delta", "forward"]
    for row in rows:
        assert row["arch"] == "sm_90a" and row["head_dim"] == 128, row
        assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255, row
        assert row["shared"] <= row["shared_limit"] == 232448, row
    assert r.returncode == 0 and "NO" not in r.stdout, r.stdout


def test_autotuning_tries_only_the_tiles_made_for_the_head_dim():
    """The pruning the autotuner calls with the launch's arguments (compiled mode, as on a GPU):
    head dim 128 never meets a tile kept for 64 or less; 64 meets them all."""
    code = ("import flash_kernels as fk\n"
            "for kernel, tiles in ((fk._fwd_kernel, fk.FWD_TILES),"
            " (fk._bwd_dq_kernel, fk.DQ_TILES),\n"
            "                      (fk._bwd_dkdv_kernel, fk.DKDV_TILES)):\n"
            "    prune = lambda d: kernel.early_config_prune(kernel.configs, {}, HEAD_DIM=d)\n"
            "    assert len(prune(64)) == len(tiles)\n"
            "    kept = prune(128)\n"
            "    assert len(kept) == sum(t[-1] >= 128 for t in tiles) >= 2, kept\n"
            "    assert all(c is kernel.configs[i]"
            " for i, c in zip([i for i, t in enumerate(tiles) if t[-1] >= 128], kept))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=300)
