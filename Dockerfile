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
COPY config/skua.toml /etc/skua/skua.toml
USER skua
EXPOSE 8080 8082 4827/udp
ENTRYPOINT ["/usr/local/bin/skua"]
CMD ["serve", "--config", "/etc/skua/skua.toml"]
