# syntax=docker/dockerfile:1
# One image for every wardwatch service; the compose `command` picks the subcommand
# (ingest, worker, receiver, subscriptions, cds, archiver, deploy ..., batch nightly).

# A specific patch release, so a rebuild next month runs the same interpreter.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- builder: install the project and its dependencies into a self-contained venv -----------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# README.md* : the readme is optional for the build (setuptools only warns)
COPY pyproject.toml README.md* ./
COPY schemas/ schemas/
COPY streams/ streams/
COPY batch/ batch/
COPY wardwatch/ wardwatch/
COPY benchmarks/ benchmarks/
# every dependency ships manylinux wheels, so no compiler is needed; the cache keeps rebuilds fast.
# The train extra (scikit-learn, skl2onnx, onnx): `batch nightly` labels with batch.train, and
# `batch train` retrains, in this image
RUN --mount=type=cache,target=/root/.cache/pip pip install '.[train]'

# --- runtime: the venv and nothing else from the build ---------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WARDWATCH_DATA_DIR=/var/lib/wardwatch/data \
    WARDWATCH_MODEL_DIR=/var/lib/wardwatch/models

# A fixed non-root uid/gid; the data and model directories are created owned by it, so a fresh
# named volume mounted there inherits that ownership and is writable.
RUN groupadd --system --gid 10001 wardwatch \
 && useradd --system --uid 10001 --gid wardwatch --create-home --home-dir /home/wardwatch \
        --shell /usr/sbin/nologin wardwatch \
 && mkdir -p /var/lib/wardwatch/data /var/lib/wardwatch/models \
 && chown -R wardwatch:wardwatch /var/lib/wardwatch

COPY --from=builder /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/wardwatch/healthcheck.py
# The shipped model registry, `current` pointer included, where WARDWATCH_MODEL_DIR points: Docker
# fills a new named volume with the image's content at its mount point, so a fresh `models` volume
# scores with the shipped model. Owned by the runtime user: promote and rollback rewrite the pointer.
COPY --chown=wardwatch:wardwatch wardwatch/models/ /var/lib/wardwatch/models/

USER wardwatch
# faust keeps its local table state under the working directory: the user's home is writable
WORKDIR /home/wardwatch

# compose overrides it per service; this one serves a plain `docker run`
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
    CMD ["python", "/opt/wardwatch/healthcheck.py"]

ENTRYPOINT ["wardwatch"]
CMD ["--help"]
