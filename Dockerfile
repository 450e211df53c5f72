# Gatehouse container image: build with the full toolchain, run on a slim base as a non-root user.
#   docker build -t gatehouse .
#   docker run -p 8080:8080 -v $PWD/conf:/etc/gatehouse gatehouse

FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin gatehouse -p gatehouse \
 && strip target/release/gatehouse

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system gatehouse && useradd --system --gid gatehouse --home /var/lib/gatehouse gatehouse \
 && mkdir -p /etc/gatehouse /var/lib/gatehouse /run/gatehouse && chown gatehouse:gatehouse /var/lib/gatehouse /run/gatehouse
COPY --from=build /src/target/release/gatehouse /usr/local/bin/gatehouse
COPY conf/gatehouse.yaml /etc/gatehouse/gatehouse.yaml
USER gatehouse
EXPOSE 8080 9901
# tini forwards SIGTERM (graceful drain), SIGHUP (reload) and SIGQUIT (upgrade) to Gatehouse.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/gatehouse"]
CMD ["run", "-c", "/etc/gatehouse/gatehouse.yaml"]
