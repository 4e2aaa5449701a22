"""Command-line parsing that refuses a bad command line in one line, as every other bad input is refused."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

USAGE_ERROR_STATUS = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, whose refusals are one line naming the problem and where the usage is (argparse's own
    print the usage block first); its sub-commands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        if message.endswith("expected one argument"):
            message += " (write a value that starts with '-' as --option=VALUE)"
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(USAGE_ERROR_STATUS)
