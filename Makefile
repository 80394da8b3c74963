# The README's commands. Each target installs what it needs first (a .venv with requirements.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# One pretraining run of the tiny preset on the embedded default corpus (the Python standard
# library's source), 3D-parallel on 4 CPU processes: 2 data-parallel ZeRO-3 replicas x 2
# tensor-parallel ranks, one thread each (5 min 18 s on 2 CPU cores, about 9k tokens/s).
TORCHRUN := OMP_NUM_THREADS=1 $(VENV)/bin/torchrun
PARALLEL_FLAGS ?= --nproc_per_node 4 pretrain.py --zero 3 --tp 2
PRETRAIN_FLAGS ?= --model tiny --batch-size 32 --max-steps 300 --lr 2e-3 --warmup-steps 30 \
                  --eval-every 100 --log-every 25 --out out/pretrain

# Supervised fine-tuning on the embedded instruction set (stdlib functions from their docstrings),
# from make pretrain's checkpoint (sharded over 4 ranks; sft.py reads it on its own layout,
# checkpoint.py): make pretrain runs first if out/pretrain has none. The fine-tuning itself: 100
# steps of 16 examples, in one process.
SFT_FLAGS ?= --out out/sft

.PHONY: install pretrain sft test estimate scaling bench gpu-check kernels clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@echo "Creating $(VENV) and installing requirements.txt into it" \
	    "(torch is the large one: a minute or more)..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

pretrain: install
	$(TORCHRUN) $(PARALLEL_FLAGS) $(PRETRAIN_FLAGS)

sft: install
	@test -f out/pretrain/latest || { \
	    echo "make sft, 1/2: no checkpoint in out/pretrain: make pretrain first"; $(MAKE) pretrain; }
	@echo "make sft, 2/2: fine-tuning out/pretrain's newest checkpoint on the embedded instruction set"
	$(PY) sft.py --init out/pretrain $(SFT_FLAGS)

test: install
	$(PY) -m pytest -q

# Our DDP vs torch DDP and our ZeRO-3 vs torch FSDP2, world size 2 on CPU gloo: about a minute on 2
# cores; then our ZeRO-3 x tp 2 vs FSDP2 over torch's tensor parallelism (world 4) and our 1F1B vs
# torch's Schedule1F1B (world 2): a few minutes more.
bench: install
	$(PY) benchmarks/bench_dp.py --out out/bench/bench_dp.json
	$(PY) benchmarks/bench_parallel.py --out out/bench/bench_parallel.json

# On a CUDA machine only: the GPU tests, python flash_attn.py, one-GPU pretrain.py runs in bf16 and
# fp8 and, with two GPUs or more, ZeRO-3 x tp 2 on all of them, DDP, 1F1B, cp ring, ep all-to-all
# and a resume on another layout; one table at the end (benchmarks/gpu_check.py; about 12 minutes on
# one H100/H200, estimated).
gpu-check: install
	$(PY) benchmarks/gpu_check.py

# No GPU needed: every autotuning config of flash_kernels.py compiled for sm_80 (A100) and sm_90a
# (H100/H200) by the ptxas that ships with Triton; registers, spills and shared memory per config
# (minutes on 2 CPU cores).
kernels: install
	$(PY) benchmarks/kernels.py

estimate: install
	$(PY) estimate.py --model gpt2-124m --chinchilla --gpus 8

# IsoFLOP profiles and a fit of L(N, D): 14 small runs on the embedded corpus, one thread, resumable
# (8 minutes on 2 CPU cores with light other load, measured once).
scaling: install
	OMP_NUM_THREADS=1 $(PY) scaling.py --out out/scaling

clean:
	rm -rf out data .pytest_cache
