"""The base of every error a user can cause: a setting that cannot work, an input that cannot be read
as configured, a cluster that cannot hold the job. Each stage's error class derives from it and its
message says what is wrong and what to do, so the command line shows that message alone (exit status
2) instead of a stack trace, also when the error was raised inside a Ray task or actor."""


class UserError(Exception):
    """An error whose message names the setting, file or resource at fault and the fix."""
