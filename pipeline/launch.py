"""`bash run.sh build`: Snakemake, with Ctrl-C answered in one line from the very first moment.

Until the Snakefile installs its own handler (`pipeline.build.quiet_interrupts`), which lets Snakemake cancel
its jobs and release its lock, an interrupt can only come while Python imports Snakemake or reads the workflow:
nothing has started, so this stops at once with the same line. Imports nothing heavy before the handler is in.

Snakemake's note that a profile sets its defaults ("Using profile ... for setting default command line
arguments.", printed as it reads its arguments) is left out: the command names the profile, and a config the
workflow refuses is then answered in one line, as every bad input is.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from pathlib import Path
from types import FrameType

STOPPED_LINE = "stopped; rerun the same command to resume"
INTERRUPTED_STATUS = 130
CONFIG_FILE_FLAGS = ("--configfile", "--configfiles")
CONFIG_FILE_FIX = "give a YAML file of key: value lines (shipped: config/config.yaml, config/city.yaml)"
PROFILE_NOTE_END = " for setting default command line arguments."
# Names the file that Ctrl-C creates (`pipeline.build.quiet_interrupts`). A job launched just as the interrupt came
# misses the signal, and Snakemake would wait for it to the end: the job finds the file and does not start.
STOP_MARK_ENV = "SAT2SOUND_STOP_MARK"


def stop_marked() -> bool:
    """Whether the build that launched this job was stopped (Ctrl-C)."""
    mark = os.environ.get(STOP_MARK_ENV)
    return mark is not None and os.path.exists(mark)


def _stop_early(signum: int, frame: FrameType | None) -> None:
    # The process's own stderr: Snakemake's reading of its arguments may be under a redirect (`_snakemake`).
    print(STOPPED_LINE, file=sys.__stderr__, flush=True)
    sys.stdout.flush()
    # Not sys.exit: its SystemExit would be raised wherever the import happens to be, and some places turn it
    # into another error with a traceback (a class body's __set_name__ wraps it in a RuntimeError). Nothing is
    # open or written yet that needs closing.
    os._exit(INTERRUPTED_STATUS)


def config_files(argv: list[str]) -> list[str]:
    """The files named after --configfile (or --configfiles), as Snakemake reads them: every argument up to the
    next flag."""
    files, reading = [], False
    for argument in argv:
        flag, equals, value = argument.partition("=")
        if flag in CONFIG_FILE_FLAGS:
            reading = not equals
            if equals:
                files.append(value)
        elif argument.startswith("-"):
            reading = False
        elif reading:
            files.append(argument)
    return files


def main() -> int:
    signal.signal(signal.SIGINT, _stop_early)
    from common.cli import USAGE_ERROR_STATUS
    from common.errors import Sat2SoundError
    from common.mapping_file import read_mapping

    try:
        for path in config_files(sys.argv[1:]):
            read_mapping(Path(path), "--configfile", CONFIG_FILE_FIX, Sat2SoundError)
    except Sat2SoundError as exc:  # Snakemake would answer with a traceback or a WorkflowError
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    return _snakemake(sys.argv[1:])


def _without_profile_note(text: str) -> str:
    """`text` (what Snakemake printed while reading its arguments) less its line on the profile."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.rstrip("\n").endswith(PROFILE_NOTE_END))


def _snakemake(argv: list[str]) -> int:
    """What `snakemake.cli.main` does, less the profile note (module docstring)."""
    from snakemake.cli import args_to_api, parse_args
    from snakemake.exceptions import print_exception

    sys.argv[0] = "snakemake"
    heard = io.StringIO()
    try:
        with contextlib.redirect_stderr(heard):
            parser, args = parse_args(argv)
    finally:  # argparse's usage errors too
        sys.stderr.write(_without_profile_note(heard.getvalue()))
    try:
        return 0 if args_to_api(args, parser) else 1
    except Exception as exc:  # as snakemake.cli.main answers
        print_exception(exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
