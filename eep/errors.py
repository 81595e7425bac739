"""The one error type for mistakes a user can fix (bad config, bad genome, bad path)."""


class EepError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""
