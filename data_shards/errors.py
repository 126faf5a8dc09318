"""The one error type of ``data_shards``: bad input, printed by the CLI as one line (exit code 2)."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or shards; the message is one line naming the file, line/record and field."""


class CorruptShardError(DataError):
    """A shard whose bytes do not match the manifest (truncated, bit flip, unreadable tar or JSON)."""
