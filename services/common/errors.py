"""Error kinds that decide what the runtime does with a failed piece of work."""


class DependencyUnavailable(Exception):
    """A server we depend on (S3, Triton, Kafka) did not answer: retry the same work later, never dead-letter it."""


class PermanentError(Exception):
    """The input itself is bad: retrying cannot help, send it to the dead-letter topic at once."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        # A short, bounded token used as a metric label.
        self.reason = reason
