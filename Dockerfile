# Skua in a container. Not built in this project's CI (no registry access for base images
# there); kept simple on purpose.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --home /var/cache/skua skua && mkdir -p /etc/skua /var/cache/skua \
    && chown skua /var/cache/skua
COPY --from=build /src/target/release/skua /usr/local/bin/skua
# The example binds loopback; in a container the published ports must be reachable from
# outside it, so the proxy, admin and HTCP addresses listen on every interface here (admin
# and HTCP stay behind their allow lists: publish them only to an internal network).
COPY config/skua.toml /etc/skua/skua.toml
RUN sed -i -e 's/^listen = \["127.0.0.1:8080"\]/listen = ["0.0.0.0:8080"]/' \
           -e 's/^admin = "127.0.0.1:8082"/admin = "0.0.0.0:8082"/' \
           -e 's/^listen = "127.0.0.1:4827"/listen = "0.0.0.0:4827"/' /etc/skua/skua.toml \
    && grep -q '^listen = \["0.0.0.0:8080"\]' /etc/skua/skua.toml \
    && grep -q '^admin = "0.0.0.0:8082"' /etc/skua/skua.toml
USER skua
EXPOSE 8080 8082 4827/udp
ENTRYPOINT ["/usr/local/bin/skua"]
CMD ["serve", "--config", "/etc/skua/skua.toml"]
