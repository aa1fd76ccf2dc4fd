"""User-facing error types.

A `UserError` is a mistake the user can fix (a config value, a missing file, bad data). The CLI
prints its message as one line and exits with code 2; anything else is a bug and keeps its
traceback. Internal invariants use plain exceptions, never these.
"""


class UserError(Exception):
    """Base class for errors caused by user input; the message names the problem and the fix."""


class ConfigError(UserError):
    """Malformed, unknown or inconsistent configuration."""


class DataError(UserError):
    """Missing, empty, corrupt or unreadable data or tokenizer files."""


class NotYetAvailable(UserError):
    """A command whose issue has not landed yet."""


class TrainingError(UserError):
    """Training cannot continue (non-finite loss); the message says what to change."""
