"""The one error type for bad input: a checkpoint, adapter, data file or setting the user must fix."""


class InputError(ValueError):
    """Bad input. The message names the file or key and says what to do; the CLI exits with code 2."""
