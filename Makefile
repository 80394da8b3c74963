# The README's commands. Each target installs what it needs first (a .venv with requirements.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# One pretraining run of the tiny preset on the embedded default corpus (the Python standard library's
# source), 3D-parallel on 4 CPU processes: 2 data-parallel ZeRO-3 replicas x 2 tensor-parallel ranks, one
# thread each (2 CPU cores: about 5 minutes).
TORCHRUN := OMP_NUM_THREADS=1 $(VENV)/bin/torchrun
PARALLEL_FLAGS ?= --nproc_per_node 4 pretrain.py --zero 3 --tp 2
PRETRAIN_FLAGS ?= --model tiny --batch-size 32 --max-steps 300 --lr 2e-3 --warmup-steps 30 \
                  --eval-every 100 --log-every 25 --out out/pretrain

# Supervised fine-tuning of that checkpoint on the embedded instruction set (stdlib functions from their
# docstrings): pretrains first when out/pretrain holds no checkpoint. 100 steps of 16 examples: 15 minutes
# measured on 2 cores shared with three other jobs (not yet timed on an idle machine).
SFT_FLAGS ?= --init out/pretrain --out out/sft

.PHONY: install pretrain sft test estimate bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

pretrain: install
	$(TORCHRUN) $(PARALLEL_FLAGS) $(PRETRAIN_FLAGS)

sft: install
	@test -f out/pretrain/ckpt.pt || $(MAKE) pretrain
	$(PY) sft.py $(SFT_FLAGS)

test: install
	$(PY) -m pytest -q

# Our DDP vs torch DDP and our ZeRO-3 vs torch FSDP2, world size 2 on CPU gloo: about a minute on 2 cores.
bench: install
	$(PY) benchmarks/bench_dp.py --out out/bench/bench_dp.json

estimate: install
	$(PY) pretrain.py --model gpt2-124m --estimate --chinchilla --gpus 8

clean:
	rm -rf out .pytest_cache
