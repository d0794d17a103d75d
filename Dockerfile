# One image for every loopsync role: `loopsync sim`, `loopsync worker …`, `loopsync run`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# --locked: the dependencies of Cargo.lock, as tested; a build never resolves new ones.
RUN cargo build --release --locked -p loopsync --bin loopsync

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin loopsync
COPY --from=build /src/target/release/loopsync /usr/local/bin/loopsync
# Not root: numeric, so that a runtime can check it (Kubernetes' runAsNonRoot).
USER 10001:10001
ENTRYPOINT ["loopsync"]
