# syntax=docker/dockerfile:1.7
# Apache Kafka (KRaft) from its Maven Central jars on a Java 17 runtime, with the environment
# contract of the apache/kafka image that the chart relies on: KAFKA_* variables become
# server.properties (KAFKA_FOO_BAR -> foo.bar), CLUSTER_ID formats the log directory on first
# start, and /opt/kafka/bin has kafka-topics.sh, kafka-configs.sh and kafka-storage.sh.
#
# The context is a directory holding libs/ (the jars: `mvn dependency:copy-dependencies` of
# docker/kafka/pom.xml) and this repository's docker/kafka/ files; k8s/cluster/build-images.sh
# assembles it:
#   docker build -f docker/kafka.Dockerfile -t internet-explorer/kafka:4.1.1 <context>
ARG JRE_IMAGE=eclipse-temurin:17-jre
FROM ${JRE_IMAGE}
LABEL org.opencontainers.image.title="internet-explorer-kafka" \
      org.opencontainers.image.description="Apache Kafka (KRaft) from Maven Central jars" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY libs /opt/kafka/libs
COPY docker/kafka/bin /opt/kafka/bin
COPY docker/kafka/run /etc/kafka/docker/run
COPY docker/kafka/log4j2.yaml docker/kafka/tools-log4j2.yaml /etc/kafka/docker/
RUN chmod 0755 /opt/kafka/bin/* /etc/kafka/docker/run \
 && mkdir -p /opt/kafka/config /opt/kafka/logs /var/lib/kafka/data \
 && chown -R 1000:1000 /opt/kafka/config /opt/kafka/logs /var/lib/kafka
ENV PATH=/opt/kafka/bin:$PATH
# The apache/kafka image's user (uid 1000), as the chart expects.
USER 1000:1000
EXPOSE 9092 9093
ENTRYPOINT ["/etc/kafka/docker/run"]
