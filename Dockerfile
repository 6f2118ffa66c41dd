# The kubetoken image: one static-enough binary on distroless, running as a non-root user.
#   docker build --build-arg KUBETOKEN_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t kubetoken .
#   docker run --rm kubetoken --version
FROM rust:1.89-bookworm AS build
# aws-lc-sys builds its C code with cmake and clang/gcc.
RUN apt-get update && apt-get install -y --no-install-recommends cmake clang && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG KUBETOKEN_GIT_COMMIT=unknown
ENV KUBETOKEN_GIT_COMMIT=${KUBETOKEN_GIT_COMMIT}
RUN cargo build --locked --release --bin kubetoken && cp target/release/kubetoken /kubetoken

# glibc and libgcc (aws-lc and the Rust runtime need them), CA certificates, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /kubetoken /usr/local/bin/kubetoken
USER 65532:65532
# Allocations of 128 KiB and more are mapped and unmapped, never kept in the heap: glibc otherwise raises this
# threshold after the first large free and keeps the megabyte buffers of token-state snapshots, so a sidecar holding
# 100,000 token keys grew from about 30 to 46 MiB after a few snapshots (BENCHMARKS.md, in-cluster section).
ENV MALLOC_MMAP_THRESHOLD_=131072
ENTRYPOINT ["/usr/local/bin/kubetoken"]
CMD ["--help"]
