# twinmesh node image: one binary, every tier (`twinmesh node --tier ...`).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p twinmesh-cli --bin twinmesh

FROM debian:bookworm-slim
RUN useradd --system --home /data twinmesh && mkdir -p /data && chown twinmesh /data
COPY --from=build /src/target/release/twinmesh /usr/local/bin/twinmesh
USER twinmesh
VOLUME /data
EXPOSE 7447 50051 8080
ENTRYPOINT ["twinmesh"]
