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
	@{ command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
	  || echo "note: could not install chromium (needs root and Debian's apt); the browser test will be skipped"; } & \
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dali,test,serve,deploy,owndata,bench,tracking]' \
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

quickstart: setup data/fashion-mnist
	bash resnet50/train_1gpu.sh --profile quickstart --resume auto
	$(PY) -m common evaluate --checkpoint runs/quickstart/best.pt --data data/fashion-mnist --output runs/quickstart/eval

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

# The engine against a plain PyTorch loop, and DALI against ImageFolder + PIL (results under benchmarks/results/).
compare: setup data/fashion-mnist
	$(PY) benchmarks/compare.py --data data/fashion-mnist
