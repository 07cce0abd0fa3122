# The convnets image: training (one GPU to many nodes), benchmarking and serving, on NVIDIA's PyTorch image.
#   docker build -t convnets:0.1.0 .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3 -t convnets:0.1.0 .
# The NGC PyTorch image already ships CUDA, cuDNN, NCCL, PyTorch, torchvision, DALI and apex, tuned together;
# the project is installed against those exact versions and never replaces them.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ARG DLLOGGER_REF=v1.0.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHON=python \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DLLogger is not on PyPI: NVIDIA's repository at a fixed tag.
RUN pip install --no-cache-dir "git+https://github.com/NVIDIA/dllogger@${DLLOGGER_REF}#egg=dllogger"

WORKDIR /workspace
COPY . /workspace
# Every package the base image holds is pinned to its installed version, so pip adds only what is missing
# (nvidia-ml-py, the serving extra) and cannot swap NGC's torch for a PyPI build.
RUN pip list --format=freeze > /tmp/ngc-pins.txt \
    && pip install --no-cache-dir -c /tmp/ngc-pins.txt -e '/workspace[serve,owndata]' \
    && rm -f /tmp/ngc-pins.txt \
    && python -m common info --list > /dev/null

# A non-root user; runs, data and results come in as volumes (see docker-compose.yml and the Helm chart).
RUN useradd --create-home --uid 10001 --user-group --shell /bin/bash convnets \
    && mkdir -p /workspace/runs /workspace/data /data /models /results \
    && chown convnets:convnets /workspace/runs /workspace/data /data /models /results
USER 10001:10001

EXPOSE 8000
# For `convnets serve` (KServe v2 endpoints); a training container reports unhealthy, which stops nothing.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]

CMD ["bash"]
