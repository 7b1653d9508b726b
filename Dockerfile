# syntax=docker/dockerfile:1
# The jaxjob trainer image: `docker build --build-arg ACCELERATOR=cuda12 -t IMAGE .` (or cpu, tpu).
# Its entrypoint is the trainer, so `docker run IMAGE --config=...` and the Kubernetes manifests
# under k8s/ pass trainer flags only.
#
# Stage `deps` installs the dependencies that pyproject.toml declares for the accelerator into a
# virtualenv, from pyproject.toml alone, so editing the source never rebuilds that layer. Stage
# `runtime` copies the virtualenv and the trainer source and runs as the numeric user 10001.
# No secret enters a layer: no credential ARG/ENV, nothing but pyproject.toml and trainer/ is copied
# (.dockerignore keeps the rest of the context out); on GKE the pod gets its identity from Workload
# Identity at run time.
#
# Base image: `BASE_IMAGE`, by default Docker's `python:3.12-slim-bookworm` pinned by digest. The
# tag moves with every Python patch release and Debian update, so refresh the digest on purpose:
#   docker buildx imagetools inspect python:3.12-slim-bookworm
# The digest below is the one public Dockerfiles pinned for that tag in October 2026 (the newest
# of those found: github.com/iamfatness/SwarmScribe, docker/*.Dockerfile). No image registry is
# reachable from the machines this project is built and tested on, so it has never been pulled
# here: the first real pull is its check. The container tests (tests/test_container.py,
# docs/container.md) build this same file on a local base with
# `--build-arg BASE_IMAGE=jaxjob-test-base:<key>`.
# JAX wheels carry their own CUDA libraries (jax[cuda12]) and libtpu (jax[tpu]); the GKE node
# supplies the GPU driver, so the same slim base serves all three accelerators.
ARG BASE_IMAGE=python:3.12-slim-bookworm@sha256:54c85f3c47607a77f32adec749d3c81d1348bf25833671f512b26a9b6d778cb3

FROM ${BASE_IMAGE} AS deps
ARG ACCELERATOR=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY pyproject.toml ./
# The install step (tests/test_dockerfile.py runs this exact command in a fresh virtualenv):
# requirements.txt = [project].dependencies + the ACCELERATOR extra (cpu: none), then pip check.
RUN python -c 'import sys, tomllib; accelerator = sys.argv[1]; \
        project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
        extras = {"cpu": [], "cuda12": project["optional-dependencies"]["cuda12"], \
                  "tpu": project["optional-dependencies"]["tpu"]}; \
        accelerator in extras or sys.exit( \
            f"ACCELERATOR={accelerator!r}: expected one of {sorted(extras)}"); \
        print(*project["dependencies"], *extras[accelerator], sep="\n")' \
        "${ACCELERATOR}" > requirements.txt \
    && pip install --no-cache-dir --requirement requirements.txt \
    && pip check
# Not needed at run time: the test suites that packages ship inside themselves (pandas, scipy,
# numpy, matplotlib, scikit-learn; about 0.1 GB of the 1.0 GB virtualenv, docs/container.md).
RUN find /opt/venv/lib -type d -path "*/site-packages/*/tests" -prune -exec rm -rf {} +

FROM ${BASE_IMAGE} AS runtime
ARG ACCELERATOR=cpu
LABEL org.opencontainers.image.title="jaxjob trainer" \
      org.opencontainers.image.description="python -m trainer (accelerator extra: ${ACCELERATOR})" \
      org.opencontainers.image.licenses="Apache-2.0"
# /var/cache/jaxjob holds JAX's persistent compilation cache (trainer/compile_cache.py), owned
# by the trainer's user; the pods and the TPU VM launcher mount a volume there.
RUN groupadd --gid 10001 jaxjob \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin jaxjob \
    && install -d -o 10001 -g 10001 /var/cache/jaxjob /var/cache/jaxjob/jax
COPY --from=deps /opt/venv /opt/venv
# HOME and the other caches point at /tmp: the pods run with a read-only root and an emptyDir
# there. JAXJOB_COMPILATION_CACHE_DIR=off turns the compilation cache off.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    JAXJOB_COMPILATION_CACHE_DIR=/var/cache/jaxjob/jax \
    JAXJOB_ACCELERATOR=${ACCELERATOR}
WORKDIR /app
COPY trainer/ /app/trainer/
USER 10001:10001
ENTRYPOINT ["python", "-m", "trainer"]
