"""One kind of error for user mistakes, and a wrapper that turns it into a one-line message.

A user mistake (a missing file, a value out of range, a checkpoint from another model) raises
UserError with a message that says what is wrong and how to fix it. Command-line entry points run
through `cli(main)`, which prints that message on one line to stderr and exits with status 2,
instead of a Python traceback. Bugs (any other exception) still show their traceback.
"""
import sys


class UserError(Exception):
    pass


def cli(main):
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
