"""Errors caused by the user's input (a bad flag, a missing file or model): the command-line scripts
print them as one line, without a traceback, and exit with a non-zero status."""


class UsageError(Exception):
    pass
