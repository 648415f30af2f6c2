# syntax=docker/dockerfile:1
# mc-relay image: the single binary that `deno task compile` makes, on distroless, as a non-root user.
# Build:  docker build -t mc-relay .
# Run:    docker run --rm -p 8080:8080 --env-file .env mc-relay
# No secret is baked in: configuration comes from the environment at run time.

# Build stage: cross-compiles on the build machine's own architecture for the image's target
# architecture, with the same deno.json tasks (and so the same permission set) as `deno task start`.
FROM --platform=$BUILDPLATFORM denoland/deno:2.9.6 AS build
ARG TARGETARCH
WORKDIR /src
COPY deno.json deno.lock main.ts ./
# The relay's modules (main.ts is the entry and imports them; the compile task bundles them into the binary).
COPY src/ ./src/
RUN case "$TARGETARCH" in \
      amd64) target=x86_64-unknown-linux-gnu ;; \
      arm64) target=aarch64-unknown-linux-gnu ;; \
      *) echo "unsupported architecture: $TARGETARCH" >&2; exit 1 ;; \
    esac \
 && deno task "compile:$target" \
 && mv "dist/mc-relay-$target" /mc-relay \
 && mkdir -p /data

# Runtime stage: glibc and libgcc only (what a Deno binary needs), no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /mc-relay /usr/local/bin/mc-relay
# Counters, budgets and the usage ledger survive restarts in /data (a volume owned by the non-root user).
# With REDIS_URL set, Redis is used instead and STATE_PATH is ignored.
COPY --from=build --chown=65532:65532 /data /data
VOLUME /data
# Numeric, so Kubernetes can verify runAsNonRoot (65532 is distroless's nonroot user).
USER 65532:65532
ENV PORT=8080 HOST=0.0.0.0 STATE_PATH=/data/state.db
EXPOSE 8080
# The image has no shell or curl: the binary checks its own /health.
HEALTHCHECK --interval=30s --timeout=6s --start-period=5s --retries=3 CMD ["/usr/local/bin/mc-relay", "healthcheck"]
# The relay is PID 1: it handles SIGTERM itself (in-flight streams get SHUTDOWN_TIMEOUT_SECONDS), no init needed.
# Keep SHUTDOWN_TIMEOUT_SECONDS below `docker stop`'s grace period (10 s by default; raise it with --stop-timeout).
ENV SHUTDOWN_TIMEOUT_SECONDS=8
ENTRYPOINT ["/usr/local/bin/mc-relay"]
