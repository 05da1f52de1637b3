# Two commands do all the set-up on a fresh machine (see README):
#   make demo   builds .venv and fine-tunes on the built-in demo dataset with the laptop_cpu profile
#   make test   builds .venv and runs the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt
SHARED_WEIGHTS := ../shared/assets/vit_small_patch14_dinov2.imgfocus.safetensors
WEIGHTS ?= $(wildcard $(SHARED_WEIGHTS))
DEMO_DIR ?= runs/demo
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: bench-peft bench-tta demo test bench assets clean check-arm64

# torch is installed first and alone, pinned: an unpinned resolve pulls a CUDA build with GBs of nvidia-* wheels.
# Every later install runs under the same constraints file, so nothing swaps torch or onnxruntime-training.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade-strategy only-if-needed -c $(CONSTRAINTS) torch
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	@if $(BIN)/pip list 2>/dev/null | grep -qi '^nvidia-'; then echo "error: a CUDA build of torch slipped in"; exit 1; fi
	@if $(BIN)/pip list 2>/dev/null | grep -qi '^onnxruntime '; then echo "error: plain onnxruntime would overwrite onnxruntime-training"; exit 1; fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edge-alast demo-data $(DEMO_DIR)/data
	$(BIN)/edge-alast train --data $(DEMO_DIR)/data/train --val-data $(DEMO_DIR)/data/val \
		--profile laptop_cpu --img-size 112 --steps 40 --batch-size 16 --lr 1e-4 \
		$(if $(WEIGHTS),--weights $(WEIGHTS)) --out $(DEMO_DIR)/run
	@echo "run folder: $(DEMO_DIR)/run (summary.json, metrics.jsonl)"

# Real images for the tests marked `assets`, and the allocators `train --allocator auto` preloads (Debian packages;
# installed when running as root, so CI exercises the LD_PRELOAD path).
ALLOCATOR_LIBS := libtcmalloc_minimal.so.4 libjemalloc.so.2
assets:
	@missing=""; [ -f $(FASHION_MNIST) ] || missing="dataset-fashion-mnist"; \
	for lib in $(ALLOCATOR_LIBS); do /sbin/ldconfig -p 2>/dev/null | grep -q "$$lib " || missing="$$missing $$lib"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist libtcmalloc-minimal4 libjemalloc2) >/dev/null \
		|| echo "note: apt-get install failed"; fi
	@[ -f $(FASHION_MNIST) ] || echo "note: Fashion-MNIST missing (apt-get install dataset-fashion-mnist): real-image tests skip"
	@for lib in $(ALLOCATOR_LIBS); do /sbin/ldconfig -p 2>/dev/null | grep -q "$$lib " || \
		echo "note: $$lib missing (apt-get install libtcmalloc-minimal4 libjemalloc2): allocator tests skip"; done

test: $(STAMP) assets
	$(BIN)/python -m pytest -q

bench: $(STAMP) assets
	$(BIN)/python tools/make_fashion_mnist.py runs/fmnist --train 1000 --val 1000
	$(BIN)/python tools/benchmark.py --data runs/fmnist/train --val-data runs/fmnist/val \
		--weights $(SHARED_WEIGHTS) --steps 80 --batch-size 16 --lr 3e-5 --precision fp32

# The LoRA / Light-PEFT table of the README (about 30 minutes on 2 cores).
bench-peft: $(STAMP) assets
	$(BIN)/python tools/make_fashion_mnist.py runs/fmnist --train 1000 --val 1000
	$(BIN)/python tools/benchmark.py --data runs/fmnist/train --val-data runs/fmnist/val \
		--weights $(SHARED_WEIGHTS) --steps 80 --batch-size 16 --lr 3e-5 --precision fp32 --export \
		--methods full,alast,lora,alast-lora,light-peft,light-peft+alast \
		--method-set "lora,alast-lora,light-peft,light-peft+alast:lr=0.001" \
		--method-set "alast-lora,light-peft+alast:alast.alpha=0.00048" \
		--method-set "light-peft,light-peft+alast:light_peft.estimation_steps=20"

# Time to accuracy (issue 21's protocol): full, head, ALaST's updates, the static/random baselines, the ablations and
# the anneal remedy, 3 seeds on Fashion-MNIST and scikit-learn's digits at 112 px (about 25 core-minutes per
# ALaST run: a day on 2 cores); then full, the default, the remedy and random at 224 px, 3 seeds of Fashion-MNIST
# (days on 2 CPU cores; on a GPU host raise TTA_JOBS and pass TTA_ARGS='--set device=cuda'). Finished runs are cached
# under runs/ by config and code.
TTA_JOBS ?= 2
TTA_ARGS ?=
bench-tta: $(STAMP) assets
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) scikit-learn
	OMP_NUM_THREADS=1 $(BIN)/python tools/bench_tta.py --weights $(SHARED_WEIGHTS) --img-size 112 --seeds 0,1,2 \
		--datasets fmnist,digits --jobs $(TTA_JOBS) --out runs/tta $(TTA_ARGS)
	OMP_NUM_THREADS=1 $(BIN)/python tools/bench_tta.py --weights $(SHARED_WEIGHTS) --img-size 224 --seeds 0,1,2 \
		--datasets fmnist --methods full,alast-reference,alast-anneal,random --jobs $(TTA_JOBS) --out runs/tta224 $(TTA_ARGS)

# The README's Raspberry Pi install (requirements/aarch64.txt) and the oldest torch claimed
# (requirements/aarch64-oldest.txt), each installed for aarch64 and run under qemu-aarch64-static in a Debian
# bookworm arm64 userland: doctor, demo-data, a tiny train, export, predict, eval (tools/check_arm64.py). Needs root
# the first time (apt-get install qemu-user-static debootstrap; debootstrap); reuses ARM64_CACHE afterwards.
ARM64_CACHE ?= /var/cache/edge-alast-arm64
check-arm64:
	$(PYTHON) tools/check_arm64.py --cache $(ARM64_CACHE)

clean:
	rm -rf $(VENV) runs .pytest_cache
