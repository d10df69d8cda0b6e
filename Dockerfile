# syntax=docker/dockerfile:1
# The taskflow operator image: `make image` (docker build -t taskflow-operator:dev .).
# Two stages: the first builds a virtualenv from the repository, the second copies only that
# virtualenv onto the same slim base and runs as an unprivileged user.
# The base is pinned by tag; pin it by digest too for reproducible builds, e.g.
#   docker build --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:... .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/taskflow
WORKDIR /src
# Only what the package needs (see .dockerignore): pyproject.toml and operator/.
COPY . .
# nats-py's nkeys extra: NATS creds files and NKey seeds (--nats-creds-file/--nats-nkey-file)
# need it at run time.
RUN /opt/taskflow/bin/pip install '.[tracing]' 'nats-py[nkeys]' \
 && /opt/taskflow/bin/python -m compileall -q /opt/taskflow/lib \
 && /opt/taskflow/bin/taskflow-operator run --help >/dev/null

FROM ${PYTHON_IMAGE}
# 65532: the conventional "nonroot" uid/gid. It owns nothing in the image; the passwd entry lets
# libraries that ask for the user's name (getpass) work.
# (--no-log-init: no sparse lastlog/faillog entries for a high uid.)
RUN groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --no-log-init --home-dir /nonexistent \
      --shell /usr/sbin/nologin nonroot
LABEL org.opencontainers.image.title="taskflow-operator" \
      org.opencontainers.image.description="Kubernetes operator that runs Taskflows: stages of NATS requests" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/taskflow /opt/taskflow
ENV PATH=/opt/taskflow/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# The chart passes --health-address=0.0.0.0:8080 and --metrics-address=0.0.0.0:9464.
EXPOSE 8080 9464
ENTRYPOINT ["taskflow-operator", "run"]
