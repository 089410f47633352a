"""User-facing errors: bad input that the user can fix.

Console commands catch :class:`SSLInputError`, print its message as one paragraph and exit with code 2;
nothing half-written is left behind because every writer writes to a temporary name first.
"""


class SSLInputError(Exception):
    """Bad input (dataset, file, plan, argument). The message names the file/case/key and what to do."""


def run_cli(main_fn):
    """Call ``main_fn()`` and turn :class:`SSLInputError` into a clean message + exit code 2."""
    import sys
    try:
        return main_fn()
    except SSLInputError as e:
        print(f"\nERROR: {e}\n", file=sys.stderr)
        sys.exit(2)
