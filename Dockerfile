# The convnets images, from one file:
#   docker build -t convnets:0.1.0 .                                          # training, benchmarks, serving (NGC)
#   docker build --build-arg BASE_IMAGE=debian-with-python3 -t convnets:0.1.0 .  # the same on a plain Debian base
#   docker build --target serve-onnx -t convnets-serve:0.1.0 .                # ONNX Runtime serving only, no torch
# BASE_IMAGE: NGC's PyTorch image ships CUDA, cuDNN, NCCL, PyTorch, torchvision, DALI and apex, tuned together; the
# project is installed against those exact versions and never replaces them. On a base without torch (Debian's
# python3 and pip, nothing else) the build installs torch, torchvision and DALI from the package index itself, at
# the versions of constraints.txt (PyPI's builds: they carry their CUDA libraries and run on CPU as well).
# Package index: pip reads PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS and PIP_TRUSTED_HOST; pass them as build
# arguments for a corporate mirror or an air-gapped wheel server (they reach the build's RUN steps only, not the
# image; empty: pip's own default): --build-arg PIP_INDEX_URL=https://pypi.mirror.example.com/simple
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
ARG SERVE_BASE_IMAGE=python:3.11-slim-bookworm

# ---- serve-onnx: `convnets serve --runtime onnxruntime --model-dir DIR` over a `convnets export --format onnx`
# folder, for CPU nodes. ONNX Runtime, the web server and their few dependencies; no torch.
FROM ${SERVE_BASE_IMAGE} AS serve-onnx
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_TRUSTED_HOST=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_ROOT_USER_ACTION=ignore
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Only what the ONNX serving path imports, then the package without its dependencies (torch is one of them).
COPY requirements-serve-onnx.txt /tmp/requirements.txt
RUN command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && useradd --create-home --uid 10001 --user-group --shell /bin/bash convnets \
    && mkdir -p /models && chown convnets:convnets /models
WORKDIR /workspace
COPY . /workspace
RUN python -m pip install --no-cache-dir --no-deps /workspace && rm -rf /workspace/build /workspace/*.egg-info
USER 10001:10001
ENV SERVE_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"SERVE_PORT\"]}/v2/health/ready', timeout=4)"]
# A shell, so that SERVE_PORT (-e SERVE_PORT=9000 with host networking) is where the server listens.
CMD ["bash", "-c", "exec convnets serve --runtime onnxruntime --model-dir /models --host 0.0.0.0 --port \"$SERVE_PORT\""]

# ---- full (the default target): training, evaluation, benchmarks, export and serving.
FROM ${BASE_IMAGE} AS full
# The same arguments and environment as serve-onnx's: a stage on another base inherits nothing from it.
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_TRUSTED_HOST=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHON=python \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Only where the base has no torch (NGC's has): torch, torchvision and DALI, the versions constraints.txt pins. This
# layer is the large one (about 6 GB: PyPI's torch carries its CUDA libraries) and depends on constraints.txt and
# the PIP_* arguments alone, so code changes rebuild nothing of it.
COPY constraints.txt /tmp/constraints.txt
# hadolint ignore=DL3013 (the versions are constraints.txt's)
RUN command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python \
    && if python -c 'import torch' 2>/dev/null; then echo "torch $(python -c 'import torch; print(torch.__version__)') from the base image"; \
       else python -m pip install --no-cache-dir -c /tmp/constraints.txt torch torchvision nvidia-dali-cuda130; fi

# DLLogger is not on PyPI: NVIDIA's repository at a fixed tag (needs git and GitHub). DLLOGGER_REF= (empty) skips it;
# the logger then writes the same `DLLL {json}` lines itself.
ARG DLLOGGER_REF=v1.0.0
RUN if [ -n "$DLLOGGER_REF" ]; then \
      python -m pip install --no-cache-dir "git+https://github.com/NVIDIA/dllogger@${DLLOGGER_REF}#egg=dllogger"; fi

# The project's dependencies (the serving and own-data extras too), from pyproject.toml alone, so that a code change
# rebuilds only the small layer after it. Every package the base image holds is pinned to its installed version,
# so pip adds only what is missing (nvidia-ml-py, the serving extra) and cannot swap NGC's torch for a PyPI build.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -m pip list --format=freeze > /tmp/base-pins.txt \
    && python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve'] + p['optional-dependencies']['owndata']))" \
       > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir -c /tmp/base-pins.txt -r /tmp/requirements.txt \
    && rm -f /tmp/base-pins.txt /tmp/requirements.txt /tmp/pyproject.toml /tmp/constraints.txt

WORKDIR /workspace
COPY . /workspace
RUN python -m pip install --no-cache-dir --no-deps -e /workspace \
    && python -m common info --list > /dev/null

# A non-root user; runs, data and results come in as volumes (see docker-compose.yml and the Helm chart).
RUN useradd --create-home --uid 10001 --user-group --shell /bin/bash convnets \
    && mkdir -p /workspace/runs /workspace/data /data /models /results \
    && chown convnets:convnets /workspace/runs /workspace/data /data /models /results
USER 10001:10001

# For `convnets serve` (KServe v2 endpoints) on SERVE_PORT (set it where the server listens elsewhere, e.g. with host
# networking); a training container reports unhealthy, which stops nothing.
ENV SERVE_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"SERVE_PORT\"]}/v2/health/ready', timeout=4)"]

CMD ["bash"]
