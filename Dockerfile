# xskgate's container image, as control/deploy/daemonset.yaml runs it:
#   docker build -t xskgate:latest .
# The build steps are scripts/build-image, which CI runs on a plain machine
# as well (images cannot be pulled there); it checks that the runtime stage
# below installs every library the binary links that the base image lacks,
# and nothing else.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/install-deps --build && scripts/build-image /out

FROM debian:bookworm-slim
# The binary's libraries beyond the base image's (libc6, libgcc-s1, zlib1g):
# scripts/build-image compares this list with ldd of the binary.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libelf1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/xskgate /usr/local/bin/xskgate
# Root, with every capability dropped but the DaemonSet's: Kubernetes puts
# added capabilities in the effective set of root only (a non-root user
# would need file capabilities and privilege escalation), and xskgate pins
# its links in the host's bpffs and keeps its state in a host directory,
# both root's. Outside Kubernetes, control/deploy/systemd/xskgate.service
# runs it as a user of its own with ambient capabilities.
USER 0:0
ENTRYPOINT ["xskgate"]
CMD ["--help"]
