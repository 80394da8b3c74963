"""kernels.py: what ptxas makes of every flash_kernels.py config, for the A100 (sm_80) and the H100/H200 (sm_90a),
without a GPU: registers per thread, bytes spilled to local memory, shared memory per block, and whether it fits.

Triton compiles for a CUDA target offline: triton.compile(ASTSource(kernel, signature, constants),
target=GPUTarget("cuda", 90, 32)) runs the whole pipeline (Triton IR, TritonGPU IR, LLVM IR, PTX) and then the
ptxas bundled with Triton's NVIDIA backend, whose -v log holds the registers and spills; the shared memory is
Triton's own allocation (metadata.shared). A config fits when nothing spills (a spill is a round trip to local
memory, i.e. to L1/L2, inside the inner loop) and its shared memory is at most the SM's per-block limit (opt-in
maximum: 163 KB of the A100's 164, 227 KB of the H100's 228). ptxas never gives a thread more than 255 registers:
past that it spills. On sm_90a the log also says when wgmma (Hopper's asynchronous tensor-core matmul) had to be
serialized for want of registers: legal, but slow.

The kernels are compiled as a launch would compile them for bf16 tensors of head dimension 128 (Llama's; the
largest tiles), causal, without documents: 16-byte aligned pointers and N a multiple of 16.

    python benchmarks/kernels.py                    # every config, sm_80 and sm_90a (make kernels; minutes)
    python benchmarks/kernels.py --arch 90 --first  # the first (largest) config of each kernel, sm_90a only
    --json FILE writes the rows; exit status 1 when a config does not fit, 3 when no ptxas can be found.
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

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter (read when Triton is imported)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import flash_kernels as fk  # noqa: E402

# compute capability: (ptxas name, shared memory per block, bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin)
ARCHS = {80: ("sm_80", 166912), 90: ("sm_90a", 232448)}
MAX_REGISTERS = 255
POINTERS = {"*bf16": ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"), "*fp32": ("LSE", "DELTA"),
            "*i32": ("DOCS", "DSTART", "DEND")}
FLOATS = ("qk_scale", "sm_scale")
DIVISIBLE = ("N", "N_BUCKET")  # a sequence length that is a multiple of 16, as in training
HEAD_DIM = 128
CONSTANTS = dict(HEAD_DIM=HEAD_DIM, BLOCK_D=HEAD_DIM, CAUSAL=True, DOC=False, PRECISION="tf32")
# (name, jitted function, its configs: flash_kernels' autotune lists; the delta kernel's one launch)
KERNELS = [("forward", fk._fwd_kernel.fn, fk.FWD_CONFIGS), ("dK/dV", fk._bwd_dkdv_kernel.fn, fk.DKDV_CONFIGS),
           ("dQ", fk._bwd_dq_kernel.fn, fk.DQ_CONFIGS),
           ("delta", fk._bwd_delta_kernel, [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3)])]


def source(fn, config):
    """The ASTSource a launch would build: argument types, constants, 16-byte divisibility hints."""
    types = {t: kind for kind, names in POINTERS.items() for t in names}
    constants = {k: v for k, v in {**CONSTANTS, **config.kwargs}.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        signature[name] = ("constexpr" if name in constants else types.get(name)
                           or ("fp32" if name in FLOATS else "i32"))
        if name in types or name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constants, attrs)


def compile_one(job):
    """(kernel index, config index, arch) -> a row: registers, spill bytes, shared bytes, fits, note, seconds."""
    k, c, arch = job
    name, fn, configs = KERNELS[k]
    config = configs[c]
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's log, printed by Triton: read it back
    knobs.compilation.always_compile = True  # a cached binary would bring no log
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(source(fn, config), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    text = log.getvalue()
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    shared, limit = kernel.metadata.shared, ARCHS[arch][1]
    tile = " ".join(f"{k[-1]}{v}" for k, v in config.kwargs.items())  # BLOCK_M 128 -> M128
    return {"kernel": name, "config": f"{tile}, {config.num_warps} warps, {config.num_stages} stages",
            "arch": ARCHS[arch][0], "registers": registers, "spill_bytes": spills, "shared": shared,
            "shared_limit": limit, "fits": spills == 0 and shared <= limit and registers <= MAX_REGISTERS,
            "note": "wgmma serialized (registers)" if "wgmma.mma_async instructions are serialized" in text else "",
            "seconds": round(time.perf_counter() - t0, 1)}


def ptxas_missing(archs):
    """None, or why no ptxas for these targets can be run here."""
    from triton.backends.nvidia.compiler import get_ptxas_version
    try:
        for arch in archs:
            get_ptxas_version(arch)
    except Exception as e:  # (RuntimeError, OSError, CalledProcessError: whichever the lookup raises)
        return f"no ptxas for {arch}: {str(e).splitlines()[0][:120]}"
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS),
                   help="compute capabilities (80: A100, 90: H100/H200 as sm_90a)")
    p.add_argument("--first", action="store_true", help="only each kernel's first (largest) config")
    p.add_argument("--head-dim", type=int, default=HEAD_DIM, help="D of the compiled kernels (64: gpt2-124m)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiles in parallel (processes)")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    CONSTANTS.update(HEAD_DIM=args.head_dim, BLOCK_D=triton.next_power_of_2(args.head_dim))  # (forked workers)
    if why := ptxas_missing(args.arch):
        print(f"kernels.py: {why}")
        return 3
    jobs = [(k, c, arch) for arch in args.arch for k, (_, _, configs) in enumerate(KERNELS)
            for c in range(1 if args.first else len(configs))]
    print(f"flash_kernels.py, head dim {args.head_dim}, bf16, causal: {len(jobs)} compiles, triton {triton.__version__}, "
          f"{max(1, args.jobs)} at a time", flush=True)
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(compile_one, jobs))
    print(f"{'kernel':<8} {'config (tile, warps, stages)':<30} {'arch':<7} {'regs':>4} {'spilled':>7} "
          f"{'shared KB':>9} {'limit':>5} {'fits':<4} {'s':>4}  note")
    for r in rows:
        print(f"{r['kernel']:<8} {r['config']:<30} {r['arch']:<7} {r['registers']:>4} {r['spill_bytes']:>7} "
              f"{r['shared'] / 1024:>9.1f} {r['shared_limit'] // 1024:>5} {'yes' if r['fits'] else 'NO':<4} "
              f"{r['seconds']:>4.0f}  {r['note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
