# syntax=docker/dockerfile:1
# The image of the cpupool chart: `cpupool agent`, `cpupool webhook` and the static process-starter.
#   docker build -t cpupool:0.1.0 .
# Two stages: compilers and wheels stay in the build stage; the runtime image holds the installed
# package, its dependencies and one static binary.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Wheels for the package and every runtime dependency, so the runtime stage installs offline.
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .
# The process-starter runs inside user containers of any base image: it is a bundle that brings
# its own interpreter, libraries and loader. `make process-starter` builds it into dist/process-starter/.
RUN make process-starter && test -x dist/process-starter/process-starter

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cpupool" \
      org.opencontainers.image.description="Kubernetes CPU pools: device plugin agent, webhook, process-starter" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A bind mount, not COPY: the wheels never become a layer of the runtime image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links=/wheels cpupool \
 && useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin cpupool
# The agent's DaemonSet lays it out from here under the host's /opt/cpupool/ (docs/webhook.md).
COPY --from=build /src/dist/process-starter /usr/local/lib/cpupool/process-starter
# Non-root by default, which is what the webhook runs as. The agent alone runs as root (the
# kubelet's device-plugins directory belongs to root), and the chart asks for that explicitly.
USER 65532:65532
ENTRYPOINT ["cpupool"]
CMD ["--help"]
