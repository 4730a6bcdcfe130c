"""The error type every torchslim failure the user can fix is raised as."""


class TorchslimError(Exception):
    """A problem with what the user gave torchslim: the message says what was wrong and where.

    The command line prints these as one line (no traceback unless ``--debug``).
    """


class ChecksumError(TorchslimError):
    """A file's content does not match its expected checksum (corrupt, truncated or wrong file)."""
