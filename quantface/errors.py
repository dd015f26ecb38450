"""User-facing errors, and the one place that turns them into an exit status. Each carries one sentence naming the bad input; the CLI prints it without a
traceback and exits with status 2. Anything else that escapes is a bug and keeps its traceback."""


class QuantFaceError(ValueError):
    """Base of all errors caused by the user's input (files, folders, options, configs)."""


class ConfigError(QuantFaceError):
    """A configuration value is out of range or inconsistent."""


class ImageError(QuantFaceError):
    """An image file or folder cannot be used."""


class WeightsError(QuantFaceError):
    """Model weights or their config are missing, truncated or do not fit the model."""


def exit_status(job) -> int:
    """Run ``job()`` for a command-line entry point: 0 on success; a user error prints one
    ``error:`` line to stderr and gives 2 (no traceback)."""
    import sys

    try:
        job()
    except QuantFaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
