# Gatehouse container image: build with the full toolchain, run on a slim base as a non-root user.
#   docker build -t gatehouse .
#   docker run -p 8080:8080 -p 9901:9901 -v $PWD/my-gatehouse.yaml:/etc/gatehouse/gatehouse.yaml:ro gatehouse
# Without a mounted config the image serves conf/container.yaml: every request gets a 404 problem.

FROM rust:1-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin gatehouse -p gatehouse \
 && strip target/release/gatehouse

FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gatehouse \
 && useradd --system --uid 10001 --gid gatehouse --home /var/lib/gatehouse gatehouse \
 && mkdir -p /etc/gatehouse /var/lib/gatehouse /run/gatehouse && chown gatehouse:gatehouse /var/lib/gatehouse /run/gatehouse
COPY --from=build /src/target/release/gatehouse /usr/local/bin/gatehouse
COPY conf/container.yaml /etc/gatehouse/gatehouse.yaml
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# The public listener and the ops one (/healthz, /readyz, /metrics): publish 9901 only inside.
EXPOSE 8080 9901
# The last-good config snapshot of `config.source: postgres` (`snapshot_path`), kept across
# restarts so a node starts even while PostgreSQL is unreachable.
VOLUME ["/var/lib/gatehouse"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/gatehouse", "health", "--address", "127.0.0.1:9901"]
STOPSIGNAL SIGTERM
# tini forwards SIGTERM (graceful drain), SIGHUP (reload) and SIGQUIT (upgrade) to Gatehouse.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/gatehouse"]
CMD ["run", "-c", "/etc/gatehouse/gatehouse.yaml"]
