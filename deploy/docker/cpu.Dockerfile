# syntax=docker/dockerfile:1
# llmapi for CPUs: llmapi-launch, llmapi-router and llmapi-bench on Debian 12, no model inside.
#   docker build -f deploy/docker/cpu.Dockerfile -t llmapi:cpu .
#   docker run --rm -p 8000:8000 -v /models/M:/models/M:ro llmapi:cpu serve /models/M --host 0.0.0.0
# See deploy/README.md ("Docker").

ARG RUST_VERSION=1.95

# --- build: the Rust toolchain and the workspace, release binaries only.
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin llmapi-launch --bin llmapi-router --bin llmapi-bench \
    && install -D -m 0755 -t /out target/release/llmapi-launch target/release/llmapi-router \
       target/release/llmapi-bench

# --- runtime: the three binaries (they link only glibc, libm and libgcc_s), CA certificates
# for HTTPS clients, and an unprivileged user.
FROM debian:bookworm-slim AS runtime
# Debian's point releases replace package versions, so pinning them (DL3008) would break the
# build at the next point release; the base image's tag is what pins the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 llmapi \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/llmapi --shell /usr/sbin/nologin llmapi
COPY --from=build /out/ /usr/local/bin/
COPY deploy/docker/healthcheck.sh /usr/local/bin/llmapi-healthcheck
COPY deploy/k8s/lws-env.sh /usr/local/bin/llmapi-lws-env
# Numeric, so that Kubernetes runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/llmapi
ENV LLMAPI_HEALTH_PORT=8000
# 8000: the OpenAI API (and /metrics, /health); 50051: a worker's gRPC service when
# LLMAPI_WORKER_ADDR=0.0.0.0:50051; 29500: a tensor-parallel group's rendezvous.
EXPOSE 8000 50051 29500
HEALTHCHECK --interval=15s --timeout=6s --start-period=300s --retries=3 \
    CMD ["/usr/local/bin/llmapi-healthcheck"]
ENTRYPOINT ["/usr/local/bin/llmapi-launch"]
CMD ["--help"]
