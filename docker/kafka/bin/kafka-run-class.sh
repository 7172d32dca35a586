#!/bin/sh
# java with Kafka's jars, as the release's kafka-run-class.sh does (heap and log4j from the environment).
set -eu
exec java ${KAFKA_HEAP_OPTS:--Xmx256m} ${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true} \
  ${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=/etc/kafka/docker/log4j2.yaml} ${KAFKA_OPTS:-} \
  -cp '/opt/kafka/libs/*' "$@"
