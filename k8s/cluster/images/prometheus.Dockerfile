# Prometheus from Debian's package, for the cluster suite's in-cluster scrape (k8s/cluster/manifests/prometheus.yaml).
ARG BASE_IMAGE=localhost/iex/bookworm-python:3.11
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* /usr/share/prometheus/node-exporter /usr/share/doc
USER 65534:65534
ENTRYPOINT ["/usr/bin/prometheus"]
