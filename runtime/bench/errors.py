"""The one error the bench raises when it cannot run; cli.py turns it into exit 1."""


class BenchError(Exception):
    """The bench could not run (a missing tool, a part that did not start); says what to do."""
