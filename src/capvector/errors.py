"""One exception type for every problem a user can fix; the CLI prints it and exits non-zero."""


class CapvectorError(Exception):
    """A problem with the user's input: the message names the file or tensor and the fix."""
