# cvserve, CPU image. Mirrors ./build.sh and ./run.sh step for step:
#   build stage:   ./build.sh (scripts/setup.sh: cmake, nasm, pip, the ONNX Runtime library
#                  from its PyPI wheel into vendor/onnxruntime; then cargo build --release)
#   runtime stage: the binary, vendor/onnxruntime, the bundled models and run.sh, as a
#                  non-root user; ./run.sh serves on port 9001.
#   docker build -t cvserve .
#   docker run -p 9001:9001 --shm-size=512m cvserve
# Without --shm-size Docker's /dev/shm is 64 MiB: the ring shrinks to 4 slots (logged) and
# more requests get 429 under load.

FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN CVSERVE_GPU=0 ./build.sh

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /app cvserve
WORKDIR /app
COPY --from=build /src/target/release/cvserve target/release/cvserve
COPY --from=build /src/vendor/onnxruntime vendor/onnxruntime
COPY --from=build /src/vendor/flavor vendor/flavor
COPY --from=build /src/run.sh run.sh
COPY --from=build /src/models models
USER 10001:10001
ENV HOST=0.0.0.0 PORT=9001 LOG_FORMAT=json
EXPOSE 9001
# The Open Inference Protocol over gRPC (GRPC_PORT).
EXPOSE 9002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9001/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["./run.sh"]
