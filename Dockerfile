# One image for every loopsync role: `loopsync sim`, `loopsync worker …`, `loopsync run`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p loopsync --bin loopsync

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/loopsync /usr/local/bin/loopsync
ENTRYPOINT ["loopsync"]
