"""Errors that the CLI turns into a one-line message and a non-zero exit code."""


class BifrostError(Exception):
    """A user-facing error: bad input, bad configuration, a missing file. The message is the whole story."""

    exit_code = 2
