"""Errors for bad input; the command line turns them into one message and exit code 2."""


class VlxError(Exception):
    """Bad input or an impossible request: one clear message, nothing stored is changed."""

    exit_code = 2

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class DatabaseBusy(VlxError):
    """Another writer held the database for longer than we are willing to wait."""


class NotFound(VlxError):
    """A named node, VC, VM or volume is not in the database."""
