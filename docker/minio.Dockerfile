# syntax=docker/dockerfile:1.7
# MinIO (community edition, distributed as source) built with `go install github.com/minio/minio@<release>`
# as the compat suite does (services/stack/compat.py), on a minimal base. The context is a
# directory holding the `minio` binary; k8s/cluster/build-images.sh assembles it.
#   docker build -f docker/minio.Dockerfile -t internet-explorer/minio:<release> <context>
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="internet-explorer-minio" \
      org.opencontainers.image.description="MinIO built from source with go install" \
      org.opencontainers.image.licenses="AGPL-3.0"
COPY minio /usr/bin/minio
ENV HOME=/tmp
USER 10001:10001
EXPOSE 9000 9001
ENTRYPOINT ["minio"]
CMD ["server", "/data"]
