# syntax=docker/dockerfile:1
# One image for everything deploy/ runs: the server Deployment (entrypoint rust-ipam-server),
# the reconcile CronJob (rust-ipam-ctl) and the node DaemonSet (/usr/local/bin/rust-ipam-node-install,
# which copies the CNI binaries in /opt/rust-ipam/cni onto the host).
#
#   docker build -t registry.example.com/rust-ipam:0.1.0 .
#
# Needs BuildKit (the default builder of current Docker and of buildah/podman).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# musl-gcc compiles the C parts (ring) of the static CNI binaries.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY . .
# `--release` strips debuginfo and keeps symbol names (Cargo.toml); the line tables are in
# `--profile release-debug`, for a build outside the image.
# The server runs in this image's runtime stage: built against the same Debian's glibc.
# Target and registry are cache mounts, so the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p ipam-server --bin rust-ipam-server --bin rust-ipam-ctl \
 && install -D -m 0755 target/release/rust-ipam-server /out/rust-ipam-server \
 && install -D -m 0755 target/release/rust-ipam-ctl /out/rust-ipam-ctl
# The CNI plugins run on the hosts, whatever C library they have (the node's runtime execs
# them from /opt/cni/bin): statically linked against musl. Every binary of the workspace
# except the server's package, the benchmarks and the tests; the four the installer needs
# must be among them.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    target="$(uname -m)-unknown-linux-musl" \
 && cargo build --release --locked --target "$target" --workspace --bins \
      --exclude ipam-server --exclude rust-ipam-benches --exclude rust-ipam-e2e \
 && for b in rust-ipam rust-multus rust-multus-shim rust-multus-daemon rust-macvlan rust-ipvlan; do \
      install -D -m 0755 "target/$target/release/$b" "/out/cni/$b" || exit 1; \
    done

FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates: for --kubeconfig pointing at an API server with a public CA; in a
# cluster the service account's CA is used.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/rust-ipam-server /usr/local/bin/rust-ipam-server
# The reconcile CronJob's command, and for `kubectl exec` into a server pod (the Admin socket).
COPY --from=build /out/rust-ipam-ctl /usr/local/bin/rust-ipam-ctl
COPY --from=build /out/cni/ /opt/rust-ipam/cni/
COPY --chmod=0755 deploy/node/install-cni.sh /usr/local/bin/rust-ipam-node-install
# The server needs no root; the node DaemonSet sets runAsUser 0 to write host directories.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/rust-ipam-server"]
