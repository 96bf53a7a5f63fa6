# syntax=docker/dockerfile:1
# llmapi for NVIDIA GPUs: the same binaries as cpu.Dockerfile on an nvidia/cuda runtime base,
# with the CUDA kernels compiled at build time into a carried kernel cache (docs/cuda.md,
# "The carried kernel cache"), so the GPU host needs only its driver. No model inside.
#   docker build -f deploy/docker/cuda.Dockerfile -t llmapi:cuda .
#   docker run --rm --gpus all -p 8000:8000 -v /models/M:/models/M:ro llmapi:cuda \
#       serve /models/M --host 0.0.0.0 --backend cuda
# See deploy/README.md ("Docker").

ARG RUST_VERSION=1.95
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu24.04

# --- build: the Rust toolchain, the workspace, and NVRTC 12.9 with the CUDA headers from
# PyPI (as .ci/run gets them) to build the kernel cache; no GPU is needed for that.
FROM rust:${RUST_VERSION}-bookworm AS build
# Architectures the kernel cache holds machine code for: sm_90 H100/H200, sm_80 A100,
# sm_89 L4/L40, sm_120 RTX 50xx. A GPU of another architecture compiles the kernels at
# start-up with the image's NVRTC and headers instead.
ARG KERNEL_ARCHS=sm_80,sm_89,sm_90
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m pip install --no-cache-dir --break-system-packages --target /opt/nvrtc \
    nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin llmapi-launch --bin llmapi-router --bin llmapi-bench \
    && install -D -m 0755 -t /out target/release/llmapi-launch target/release/llmapi-router \
       target/release/llmapi-bench
RUN LD_LIBRARY_PATH=/opt/nvrtc/nvidia/cuda_nvrtc/lib \
    LLMAPI_CUDA_INCLUDE=/opt/nvrtc/nvidia/cuda_runtime/include \
    /out/llmapi-launch kernels build --arch "${KERNEL_ARCHS}" --out /out/kernel-cache

# --- runtime: nvidia/cuda's runtime image has cuBLAS 12, NVRTC 12 and NCCL 2; libcuda comes
# from the host's driver through the NVIDIA container toolkit (docker --gpus, the Kubernetes
# device plugin). cudarc opens libnccl.so by its unversioned name, which only the -dev
# package ships, so a directory of that one link goes first on the loader path.
FROM ${CUDA_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && nccl=$(find / -xdev -name 'libnccl.so.2' -print -quit) \
    && test -n "$nccl" \
    && mkdir -p /opt/llmapi/lib \
    && ln -s "$nccl" /opt/llmapi/lib/libnccl.so \
    && groupadd --system --gid 10001 llmapi \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/llmapi --shell /usr/sbin/nologin llmapi
COPY --from=build /out/llmapi-launch /out/llmapi-router /out/llmapi-bench /usr/local/bin/
COPY --from=build --chown=10001:10001 /out/kernel-cache /opt/llmapi/kernel-cache
# The CUDA headers NVRTC needs (cuda_bf16.h) for an architecture the cache lacks.
COPY --from=build /opt/nvrtc/nvidia/cuda_runtime/include /opt/llmapi/cuda-include
COPY deploy/docker/healthcheck.sh /usr/local/bin/llmapi-healthcheck
COPY deploy/k8s/lws-env.sh /usr/local/bin/llmapi-lws-env
ENV LD_LIBRARY_PATH=/opt/llmapi/lib:/usr/local/cuda/lib64:/usr/local/nvidia/lib64 \
    LLMAPI_KERNEL_CACHE=/opt/llmapi/kernel-cache \
    LLMAPI_CUDA_INCLUDE=/opt/llmapi/cuda-include \
    LLMAPI_HEALTH_PORT=8000 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Numeric, so that Kubernetes runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/llmapi
EXPOSE 8000 50051 29500
HEALTHCHECK --interval=15s --timeout=6s --start-period=600s --retries=3 \
    CMD ["/usr/local/bin/llmapi-healthcheck"]
ENTRYPOINT ["/usr/local/bin/llmapi-launch"]
CMD ["--help"]
