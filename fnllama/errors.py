"""Error types for user-facing failures.

A `UserError` is bad input (a flag, a file, a field): the CLI prints its message on one
line and exits 2, without a traceback (unless `--debug`). Messages name the file, the
field and what was expected.
"""


class UserError(Exception):
    """Bad input from the user: the message says what, where, and the fix."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value or flag."""


class DataError(UserError, ValueError):
    """Unreadable or inconsistent data files (parquet, json, .bin/.idx, tokenizer)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or does not fit the model."""


class HFError(UserError, ValueError):
    """An HF model directory that cannot be imported or exported."""
