# One static binary on an empty image (pause, CoreDNS): the context holds the binary as `bin`.
FROM scratch
ARG NAME
COPY bin /bin/entry
USER 65534:65534
ENTRYPOINT ["/bin/entry"]
