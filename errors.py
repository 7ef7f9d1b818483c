"""One kind of error for user mistakes, a wrapper that turns it into a one-line message, and the
argument parser every command-line tool uses (its mistakes are user mistakes too).

A user mistake (a missing file, a value out of range, a checkpoint from another model) raises
UserError with a message that says what is wrong and how to fix it. Command-line entry points run
through `cli(main)`, which prints that message on one line to stderr and exits with status 2,
instead of a Python traceback. Bugs (any other exception) still show their traceback.
"""
import argparse
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError: one line, status 2 (argparse prints its whole usage)."""

    def __init__(self, description=None, **kwargs):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")
