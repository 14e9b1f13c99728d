# Builds the portcullis binary into a small runtime image.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin portcullis

FROM debian:bookworm-slim
RUN useradd --system --home /data portcullis && mkdir -p /data && chown portcullis /data
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
USER portcullis
WORKDIR /data
EXPOSE 50051 50052
ENTRYPOINT ["portcullis"]
CMD ["serve", "--authz-addr", "0.0.0.0:50051", "--admin-addr", "0.0.0.0:50052"]
