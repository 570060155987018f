"""The one exception type peftkit raises for bad input.

A subclass of ValueError so callers that already catch ValueError keep working;
every message names the problem and what would be valid.
"""


class PeftkitError(ValueError):
    pass
