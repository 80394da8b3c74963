"""kernels.py: what ptxas makes of every flash_kernels.py config, for the A100 (sm_80) and the
H100/H200 (sm_90a), without a GPU: registers per thread, bytes spilled to local memory, shared
memory per block, and whether it fits.

Triton compiles for a CUDA target offline: triton.compile(ASTSource(kernel, signature, constants),
target=GPUTarget("cuda", 90, 32)) runs the whole pipeline (Triton IR, TritonGPU IR, LLVM IR, PTX)
and then the ptxas bundled with Triton's NVIDIA backend, whose -v log holds the registers and
spills; the shared memory is Triton's own allocation (metadata.shared). A config fits when nothing
spills (a spill is a round trip to local memory, i.e. to L1/L2, inside the inner loop) and its
shared memory is at most the SM's per-block limit (opt-in maximum: 163 KB of the A100's 164, 227 KB
of the H100's 228). ptxas never gives a thread more than 255 registers: past that it spills. On
sm_90a the log also says when wgmma (Hopper's asynchronous tensor-core matmul) had to be serialized
for want of registers: legal, but slow.

The kernels are compiled as a launch would compile them for bf16 tensors, causal, without documents
(16-byte aligned pointers, N a multiple of 16), each autotuning candidate at the largest head dim it
is kept for (flash_kernels.py's *_TILES: 64 for the largest tiles, 128 for the others).

    python benchmarks/kernels.py  # every config, sm_80 and sm_90a (make kernels; minutes)
    python benchmarks/kernels.py --arch 90 --head-dim 128 --first  # each kernel's first config
    --json FILE writes the rows; exit status 1 when a config does not fit, 3 when no ptxas is found.
"""
import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import re
import sys
import time

# compiled kernels, not the interpreter (read when Triton is imported)
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9's default (multiply-adds fused), unwarned
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import flash_kernels as fk  # noqa: E402

# compute capability: (ptxas name, shared memory per block in bytes, as
# cudaDevAttrMaxSharedMemoryPerBlockOptin reports it)
ARCHS = {80: ("sm_80", 166912), 90: ("sm_90a", 232448)}
MAX_REGISTERS = 255
POINTERS = {"*bf16": ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"), "*fp32": ("LSE", "DELTA"),
            "*i32": ("DOCS", "DSTART", "DEND")}
FLOATS = ("qk_scale", "sm_scale")
DIVISIBLE = ("N", "N_BUCKET")  # a sequence length that is a multiple of 16, as in training
CONSTANTS = dict(CAUSAL=True, DOC=False, PRECISION="tf32")
# (name, jitted function, tiles (a, b, warps, stages, largest head dim), the names of a and b):
# flash_kernels' autotuning candidates; the delta kernel's one launch (64 rows, Triton's
# default 4 warps and 3 stages)
KERNELS = [("forward", fk._fwd_kernel.fn, fk.FWD_TILES, ("BLOCK_M", "BLOCK_N")),
           ("dK/dV", fk._bwd_dkdv_kernel.fn, fk.DKDV_TILES, ("BLOCK_N", "BLOCK_M")),
           ("dQ", fk._bwd_dq_kernel.fn, fk.DQ_TILES, ("BLOCK_M", "BLOCK_N")),
           ("delta", fk._bwd_delta_kernel, [(64, None, 4, 3, 128)], ("BLOCK_M", None))]


def source(fn, blocks, head_dim):
    """The ASTSource a launch would build: argument types, constants, 16-byte divisibility hints."""
    types = {t: kind for kind, names in POINTERS.items() for t in names}
    constants = {**CONSTANTS, **blocks, "HEAD_DIM": head_dim,
                 "BLOCK_D": triton.next_power_of_2(head_dim)}
    constants = {k: v for k, v in constants.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        signature[name] = ("constexpr" if name in constants else types.get(name)
                           or ("fp32" if name in FLOATS else "i32"))
        if name in types or name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constants, attrs)


def compile_one(job):
    """(kernel index, tile index, arch, head dim) -> a row: registers, spill bytes, shared bytes,
    fits, note, seconds."""
    k, t, arch, head_dim = job
    name, fn, tiles, names = KERNELS[k]
    a, b, warps, stages, _ = tiles[t]
    blocks = {n: v for n, v in zip(names, (a, b)) if n is not None}
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's log, printed by Triton: read it back
    knobs.compilation.always_compile = True  # a cached binary would bring no log
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(source(fn, blocks, head_dim), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": warps, "num_stages": stages})
    text = log.getvalue()
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    shared, limit = kernel.metadata.shared, ARCHS[arch][1]
    tile = " ".join(f"{n[-1]}{v}" for n, v in blocks.items())  # BLOCK_M 128 -> M128
    fits = spills == 0 and shared <= limit and registers <= MAX_REGISTERS
    serialized = "wgmma.mma_async instructions are serialized" in text
    return {"kernel": name, "head_dim": head_dim,
            "config": f"{tile}, {warps} warps, {stages} stages", "arch": ARCHS[arch][0],
            "registers": registers, "spill_bytes": spills, "shared": shared, "shared_limit": limit,
            "fits": fits, "note": "wgmma serialized (registers)" if serialized else "",
            "seconds": round(time.perf_counter() - t0, 1)}


def ptxas_missing(archs):
    """None, or why no ptxas for these targets can be run here."""
    arch = archs[0]
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version
        for arch in archs:
            get_ptxas_version(arch)
    except Exception as e:  # RuntimeError, OSError, CalledProcessError: whichever the lookup raises
        return f"no ptxas for {arch}: {str(e).splitlines()[0][:120]}"
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS),
                   help="compute capabilities (80: A100, 90: H100/H200 as sm_90a)")
    p.add_argument("--head-dim", type=int,
                   help="only the configs kept for this head dim, compiled for it (default: "
                        "each config at the largest head dim it is kept for)")
    p.add_argument("--first", action="store_true", help="only each kernel's first config")
    p.add_argument("--jobs", type=int, default=os.cpu_count(),
                   help="compiles in parallel (processes)")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    if why := ptxas_missing(args.arch):
        print(f"kernels.py: {why}")
        return 3
    jobs = []
    for k, (_, _, tiles, _) in enumerate(KERNELS):
        kept = [(t, args.head_dim or tile[-1]) for t, tile in enumerate(tiles)
                if args.head_dim is None or args.head_dim <= tile[-1]]
        jobs += [(k, t, arch, d) for arch in args.arch for t, d in kept[:1 if args.first else None]]
    jobs.sort(key=lambda job: job[2])  # by architecture
    print(f"flash_kernels.py, bf16, causal: {len(jobs)} compiles, triton {triton.__version__}, "
          f"{max(1, args.jobs)} at a time", flush=True)
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(compile_one, jobs))
    print(f"{'kernel':<8} {'D':>3} {'config (tile, warps, stages)':<30} {'arch':<7} {'regs':>4} "
          f"{'spilled':>7} {'shared KB':>9} {'limit':>5} {'fits':<4} {'s':>4}  note")
    for r in rows:
        print(f"{r['kernel']:<8} {r['head_dim']:>3} {r['config']:<30} {r['arch']:<7} "
              f"{r['registers']:>4} {r['spill_bytes']:>7} {r['shared'] / 1024:>9.1f} "
              f"{r['shared_limit'] // 1024:>5} {'yes' if r['fits'] else 'NO':<4} "
              f"{r['seconds']:>4.0f}  {r['note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
