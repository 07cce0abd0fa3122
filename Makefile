# make setup quickstart   - create .venv, prepare Fashion-MNIST, train the quickstart, print its top-1
# make test               - the test suite (CPU)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test lint data compare

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@# The page test drives Debian's chromium through Playwright (no browser download); it skips without one.
	@# apt runs in the background while pip installs: on a new machine both mostly wait on downloads.
	@# The container tests (tests/test_container.py) need Docker's engine and debootstrap, from Debian's packages too.
	@{ { command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
	  || echo "note: could not install chromium (needs root and Debian's apt); the browser test will be skipped"; }; \
	  { { command -v dockerd && command -v debootstrap; } >/dev/null 2>&1 \
	  || apt-get install -y -q --no-install-recommends docker.io debootstrap >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 \
	      && apt-get install -y -q --no-install-recommends docker.io debootstrap >/dev/null 2>&1) \
	  || echo "note: could not install docker.io and debootstrap (needs root and Debian's apt); the container tests will be skipped"; }; } & \
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dali,test,serve,deploy,owndata,bench,tracking,openvino]' \
	  && $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[photos]'; \
	  status=$$?; wait; exit $$status
	touch $@

# Debian's dataset-fashion-mnist holds the IDX files; elsewhere `prepare` falls back to torchvision's download.
data/fashion-mnist: | setup
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
	  || echo "note: could not install dataset-fashion-mnist; trying torchvision's download"
	$(PY) -m common prepare fashion-mnist --out $@

data: data/fashion-mnist

# The quickstart's kernels are held to AVX2 (oneDNN's convolutions and ATen's vector code): which instruction set
# they use changes the last bits of every step (SSE4.1 against AVX2 here: train loss 5.804 against 5.905 after 3
# steps), its short high-learning-rate schedule turns that into points of top-1, and hosts sold as one kind differ
# (AVX2 alone, or AVX-512 with bf16). Held to one, every such host trains the same numbers. A no-op on AVX2 hosts.
quickstart: setup data/fashion-mnist
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 bash resnet50/train_1gpu.sh --profile quickstart --resume auto
	$(PY) -m common evaluate --checkpoint runs/quickstart/best.pt --data data/fashion-mnist --output runs/quickstart/eval

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

# The engine against a plain PyTorch loop, and DALI against ImageFolder + PIL (results under benchmarks/results/).
compare: setup data/fashion-mnist
	$(PY) benchmarks/compare.py --data data/fashion-mnist
