"""The check of a diffusers pipeline's classes in a child process (``isolation = "process"``).

Whether the installed diffusers has the pipeline and scheduler classes the options name, the
pipeline's call takes the ``call`` arguments and a checkpoint folder holds every component
the pipeline needs can only be seen with diffusers imported, and importing it imports torch:
seconds of CPU and ~430 MB that would stay in the engine's process for the whole run. With
``isolation = "process"`` the pipelines never run there, so neither does this check: a short
child of its own imports diffusers, makes the check and exits, while the engine waits for
its answer. The check still comes before any judge loads, as it does in a thread.

The child is started as a pipeline child is (see
:mod:`~trig_stream.backends.generators.pipeline_process`): out of reach of the run's
signals, and ending with the engine's process, however that ends.

Messages, child to parent: ``("ok", (threads, defaults))``, with the threads torch computes
with there (the count this process would have had from torch, which :func:`~trig_stream.
backends.generators.pipeline_process.thread_share` shares out among the pipeline children;
None without torch) and the defaults of the pipeline call's arguments
(:attr:`~trig_stream.backends.generators.pipeline_loading.CheckedClasses.defaults`),
``("missing", None)`` (diffusers is not installed) or ``("fatal", text)``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, NamedTuple

from trig_stream.backends.generators.pipeline_child import _exit_with_parent, _leave_the_run_group
from trig_stream.backends.generators.pipeline_process import _ending, _start_in_own_session
from trig_stream.errors import FatalBackendError, MissingExtraError, TrigStreamError
from trig_stream.pipeline import describe_error

if TYPE_CHECKING:
    from trig_stream.backends.generators.diffusers_options import DiffusersOptions


class CheckedInChild(NamedTuple):
    """What :func:`check_in_child` found out in its child."""

    threads: int | None
    """The threads torch computes with there (None if the check did not import torch)."""
    call_defaults: dict[str, Any]
    """The defaults of the pipeline call's arguments that JSON holds."""


def check_in_child(
    name: str,
    options: DiffusersOptions,
    started: Callable[[BaseProcess], None] | None = None,
) -> CheckedInChild:
    """Check the classes and arguments ``options`` name against the installed diffusers, in
    a child process, as :meth:`~trig_stream.backends.generators.diffusers_generator.
    DiffusersGenerator.check_environment` checks them in this one; return what it found of
    torch's threads and the call's defaults there.

    ``started`` is given the child once it runs (a stop kills it: the check then fails).

    Raises:
        MissingExtraError: diffusers is not installed, or a library the pipeline class needs.
        FatalBackendError: what the check found wrong, or the child died before it said.
    """
    context = multiprocessing.get_context("spawn")
    answers, child_end = context.Pipe(duplex=False)
    # Never written to: the child ends when it closes, as this process ends.
    lifeline, keep_alive = context.Pipe(duplex=False)
    process = context.Process(
        target=check,
        args=(child_end, lifeline, name, options.model_dump_json()),
        name=f"trig-stream {name} check",
        daemon=True,
    )
    _start_in_own_session(process)
    if started is not None:
        started(process)
    child_end.close()  # the child holds its end: EOF here means the child is gone
    lifeline.close()
    try:
        kind, body = answers.recv()
    except (EOFError, OSError):
        process.join()
        ending = _ending(process.exitcode, " before it answered")
        raise FatalBackendError(
            f"generator {name!r}: the process checking its pipeline classes {ending}"
        ) from None
    finally:
        answers.close()
        keep_alive.close()
    process.join()  # it exits once it has answered
    if kind == "missing":
        package, extra = body if isinstance(body, tuple) else ("diffusers", "diffusers")
        raise MissingExtraError(package, extra)
    if kind != "ok":
        raise FatalBackendError(str(body))
    threads, defaults = body
    return CheckedInChild(None if threads is None else int(threads), dict(defaults))


def check(conn: Connection, lifeline: Connection, name: str, options_json: str) -> None:
    """The child: :meth:`DiffusersGenerator.check_environment` in a thread's isolation, its
    outcome sent to the parent."""
    _leave_the_run_group()
    faulthandler.enable()  # a crash in a library's import says where
    threading.Thread(
        target=_exit_with_parent, args=(lifeline,), name="lifeline", daemon=True
    ).start()
    from trig_stream.backends.generators.diffusers_generator import DiffusersGenerator
    from trig_stream.backends.generators.diffusers_options import DiffusersOptions

    options = DiffusersOptions.model_validate_json(options_json)
    answer: tuple[str, str | tuple[str, str] | tuple[int | None, dict[str, Any]] | None]
    try:
        generator = DiffusersGenerator(name, options.model_copy(update={"isolation": "thread"}))
        generator.check_environment()
        torch = sys.modules.get("torch")  # diffusers' pipelines import it
        threads = None if torch is None else torch.get_num_threads()
        answer = ("ok", (threads, generator.call_defaults))
    except MissingExtraError as exc:
        answer = ("missing", (exc.package, exc.extra))  # torch or transformers, say
    except TrigStreamError as exc:
        answer = ("fatal", str(exc))
    except Exception as exc:  # the parent must hear why: a pipeline module that fails, say
        reason = f"checking its pipeline classes failed: {describe_error(exc)}"
        answer = ("fatal", f"generator {name!r}: {reason}")
    except (SystemExit, KeyboardInterrupt) as exc:
        # A pipeline module's sys.exit() or interrupt: let through, the child ended without
        # a word, and the parent could tell no more than its exit code.
        text = str(exc)
        raised = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        answer = (
            "fatal",
            f"generator {name!r}: checking its pipeline classes failed: it raised {raised} "
            "(sys.exit() or an interrupt in a module it imports); fix that module or the "
            "option that names it, then run the same command again",
        )
    with contextlib.suppress(OSError):  # the parent may be gone
        conn.send(answer)
    conn.close()
