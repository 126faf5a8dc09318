"""The one error hierarchy of recgpt.

Every error a user can cause (a bad config key, a malformed log line, a corrupt shard, a missing
checkpoint, a bad export directory) is a :class:`RecgptError`: the CLI prints its message as one
line and exits with code 2, never a traceback. The message names what is wrong — a config key
(``train.max_steps: must be >= 0``), a file and line, a shard, a checkpoint path — never a CLI flag,
because the same library functions run from YAML configs, Python and the CLI.
"""

from __future__ import annotations


class RecgptError(Exception):
    """Base of every user-facing recgpt error: one line naming the key, file, record or path."""


class ConfigError(RecgptError, ValueError):
    """A bad configuration value or combination; the message starts with the config key."""


class DataError(RecgptError, ValueError):
    """Bad input data or shards; the message names the file, line/record and field."""


class CorruptShardError(DataError):
    """A shard whose bytes do not match the manifest (truncated, bit flip, unreadable tar or JSON)."""


class CheckpointError(RecgptError):
    """A missing, incomplete or incompatible training checkpoint; the message names its path."""


class ExportError(RecgptError):
    """A bad export (writing it, its parity check, or reading it back); the message names the path."""


class TrainingError(RecgptError):
    """Training cannot go on (e.g. train.max_bad_steps non-finite losses in a row); the last complete
    checkpoint is untouched."""


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors can span many lines).

    A message re-raised by a DataLoader worker starts with a traceback and ends with
    ``module.Class: message``: the last line is the one that says what happened, without that prefix.
    """
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    prefix = f"{type(e).__module__}.{type(e).__name__}: "
    if len(lines) > 1 and lines[-1].startswith(prefix):
        return lines[-1][len(prefix) :]
    return lines[0]
