from raypipe.errors import UserError


class InputError(UserError, ValueError):
    """Input files that cannot be read as configured; the message names the file and the fix."""
