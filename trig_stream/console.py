"""The ``trig-stream`` command's entry point, kept apart from everything it imports.

Its imports take a few tenths of a second; a Ctrl-C during them ends the command as any
other Ctrl-C does (exit 130), not with a traceback.
"""

import sys
from typing import Final, NoReturn

INTERRUPTED: Final = 130
"""The exit status of an interrupted command (:data:`trig_stream.cli.EXIT_INTERRUPTED`)."""


def entry_point() -> NoReturn:
    """Import the CLI, then run it (:func:`trig_stream.cli.entry_point`)."""
    try:
        from trig_stream.cli import entry_point as run
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)
    run()
