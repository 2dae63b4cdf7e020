"""The exit statuses of the ``trig-stream`` command.

* 0: the run finished (per-item failures are recorded and reported, not fatal);
* 1: an unexpected internal error;
* 2: bad command line, invalid config or unusable input file (nothing was done);
* 3: the run directory was refused (in use, or made with other settings), is unreadable or
  unwritable, or a report, export or comparison cannot be written where it goes;
* 4: the run stopped on a fatal error (dataset unreadable, judge credentials...); resumable;
* 130: interrupted (Ctrl-C or SIGTERM); resumable by running the same command again
  (without --new-run: see the stop message).
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_RUN_DIR = 3
EXIT_FATAL = 4
EXIT_INTERRUPTED = 130
