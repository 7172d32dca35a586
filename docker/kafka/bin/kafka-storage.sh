#!/bin/sh
KAFKA_LOG4J_OPTS="${KAFKA_TOOLS_LOG4J_OPTS:--Dlog4j2.configurationFile=/etc/kafka/docker/tools-log4j2.yaml}" KAFKA_HEAP_OPTS="${KAFKA_TOOLS_HEAP_OPTS:--Xmx256m}" KAFKA_JVM_PERFORMANCE_OPTS="-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true" exec /opt/kafka/bin/kafka-run-class.sh kafka.tools.StorageTool "$@"
