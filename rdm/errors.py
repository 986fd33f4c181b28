"""The errors rdm raises for bad input: each names what was wrong and what to do."""


class RDMError(Exception):
    """A user-facing error; the CLI prints its message without a traceback."""


class EmbedderUnavailable(RDMError):
    """CLIP weights could not be found locally nor downloaded."""


class DatabaseError(RDMError):
    """A database is missing, busy, corrupt or incompatible."""


class DatabaseCorrupt(DatabaseError):
    """A database file failed its checksum or could not be read."""


class DatabaseBusy(DatabaseError):
    """Another process is writing the same database."""


class NotFound(RDMError):
    """What a request names is not there: an item, a column, any item matching a filter."""


class SourceError(RDMError):
    """An image source does not exist or cannot be read."""


class UnsafeCheckpoint(RDMError):
    """A checkpoint's pickle asks for something outside the tensor allow-list."""
