"""What a run makes sure of before it writes anything, shared by the engine and ``validate``.

* each backend's own check of this machine (:func:`check_environment`), and its fingerprint
  (:func:`judge_fingerprint`), with a backend's unexpected exception turned into one error
  that names it;
* the manifest the run directory is opened with (:func:`run_manifest`);
* the open files the judges' connections need (:func:`ensure_open_files`);
* that no generator or judge instance is in use by another open engine
  (:func:`claim_backends`, :func:`release_backends`).
"""

from __future__ import annotations

import functools
import resource
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from trig_stream.backends.base import Generator, Judge
from trig_stream.backends.threads import call_in_thread, exiting_error, threads_left_behind
from trig_stream.config import RunConfig
from trig_stream.errors import ConfigError, FatalBackendError, TrigStreamError
from trig_stream.manifest import Manifest, as_json
from trig_stream.pipeline import describe_error
from trig_stream.records import JudgeFingerprint

FILES_BESIDE_CONNECTIONS = 256
"""Open files the engine's process may need besides its judges' connections: the journal,
image writes, libraries, a generator's child processes..."""

T = TypeVar("T")


class BackendOwner(Protocol):
    """What a claim names its owner by: an open engine and its run directory."""

    @property
    def run_dir_path(self) -> Path: ...


_backends_in_use: dict[int, BackendOwner] = {}
"""The generator and judge instances an open engine uses (by id; each alive while in use),
with the engine: one passed to a second engine at once would be loaded (or opened)
twice and closed under the other's feet by the first to end."""
_backends_in_use_lock = threading.Lock()  # engines may run in several threads' event loops


def run_manifest(
    config: RunConfig,
    generators: Sequence[Generator],
    judges: Mapping[str, JudgeFingerprint],
    *,
    retry_errors: bool = False,
) -> Manifest:
    """The manifest a run of ``config`` with these generators and judges' fingerprints (by
    name) writes in its run directory, and compares with the one stored there;
    ``retry_errors``: whether the run asks again the ``error`` judgements."""
    manifest = Manifest(
        run_name=config.run.name,
        task=config.run.task,
        retry_errors=retry_errors,
        generators={
            g.name: as_json(
                {**_fingerprint(g), "seed": config.run.seed},
                f"the fingerprint of generator {g.name!r}",
            )
            for g in generators
        },
        judges={name: fp.model_dump(mode="json") for name, fp in judges.items()},
        config=config.model_dump(mode="json"),
    )
    manifest.set_generator_defaults({g.name: _fingerprint_defaults(g) for g in generators})
    return manifest


def ensure_open_files(
    config: RunConfig, judges: Sequence[Judge], *, raise_limit: bool = True
) -> None:
    """Make sure this process may open the files a run of ``config`` with these ``judges``
    needs: each request in flight of an HTTP judge holds a socket, so with a high
    concurrency the soft open-file limit (often 1024) is raised toward what the judges need,
    up to the hard limit; past that the run would fail mid-way ("Too many open files").

    Args:
        raise_limit: False (``validate``): only read the limits, and refuse what the run,
            raising the soft limit as far as the hard one, would refuse.

    Raises:
        ConfigError: the judges may need more files than the hard limit allows.
    """
    adaptive = {entry.name: entry.adaptive for entry in config.judges}
    needs = {}
    for judge in judges:
        policy = adaptive.get(judge.name)
        in_flight = judge.concurrency  # adaptive: the starting limit, or its max if more
        if policy is not None and policy.enabled:
            in_flight = max(in_flight, policy.max)
        needs[judge.name] = _backend_call(
            judge, "connections()", functools.partial(judge.connections, in_flight)
        )
    needed = sum(needs.values())
    if not needed:
        return
    wanted = needed + FILES_BESIDE_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted <= soft:
        return
    limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if raise_limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    if limit < wanted:
        detail = ", ".join(f"{name} {count}" for name, count in needs.items() if count)
        raise ConfigError(
            f"the judges may hold {needed} connections at once ({detail}), but this "
            f"process may open only {hard} files (the hard limit, `ulimit -Hn`), and needs "
            f"~{FILES_BESIDE_CONNECTIONS} besides: lower their concurrency (or adaptive "
            "max), or raise the limit"
        )


def _fingerprint(generator: Generator) -> dict[str, Any]:
    """``generator.fingerprint()``, or the error that names it when it has none to give."""
    fingerprint: dict[str, Any] = _checked_fingerprint(
        generator, dict, "a dict of the settings that change its images"
    )
    return fingerprint


def _fingerprint_defaults(generator: Generator) -> dict[str, Any]:
    """``generator.fingerprint_defaults()``, or the error that names it when it has none."""
    defaults = _backend_call(generator, "fingerprint_defaults()", generator.fingerprint_defaults)
    if not isinstance(defaults, dict):
        raise FatalBackendError(
            f"{backend_label(generator)} is broken: fingerprint_defaults() returned an object "
            f"of type {type(defaults).__name__}, not a dict"
        )
    return dict(as_json(defaults, f"the fingerprint defaults of {backend_label(generator)}"))


def judge_fingerprint(judge: Judge) -> JudgeFingerprint:
    """``judge.fingerprint()``, or the error that names the judge when it has none to give.

    Raises:
        FatalBackendError: it raised (see :func:`check_environment`), returned no
            :class:`~trig_stream.records.JudgeFingerprint`, or one that JSON cannot hold (a
            NaN among its params), as a generator's is refused.
    """
    fingerprint: JudgeFingerprint = _checked_fingerprint(
        judge, JudgeFingerprint, "a JudgeFingerprint"
    )
    # Written as it was, a NaN became null in the manifest and every judgement: a fingerprint
    # its own run compares unequal with, or that holds what the judge never said.
    as_json(fingerprint.model_dump(), f"the fingerprint of {backend_label(judge)}")
    return fingerprint


def _checked_fingerprint(backend: Generator | Judge, kind: type, wanted: str) -> Any:
    fingerprint = _backend_call(backend, "fingerprint()", backend.fingerprint)
    if not isinstance(fingerprint, kind):
        raise FatalBackendError(
            f"{backend_label(backend)} is broken: fingerprint() returned an object of type "
            f"{type(fingerprint).__name__}, not {wanted}"
        )
    return fingerprint


def check_environment(backend: Generator | Judge) -> None:
    """``backend.check_environment()``: what it needs from this machine, seen before anything
    loads (``run`` and ``validate`` both make the check).

    Raises:
        TrigStreamError: what the check found missing, as the backend raised it.
        FatalBackendError: it raised another exception (a third-party backend's bug, a file
            it could not read): one error that names the backend and that exception, not a
            traceback.
    """
    _backend_call(backend, "check_environment()", backend.check_environment, in_thread=True)


def check_environments(backends: Sequence[Generator | Judge]) -> None:
    """:func:`check_environment` of each backend; called in a worker thread (a check may
    import a library), where ``sys.exit()`` in a check ends nothing, and stops the run."""
    for backend in backends:
        failed = f"{backend_label(backend)}: check_environment() failed"
        call_in_thread(check_environment, backend, failed=failed)


def backend_label(backend: Generator | Judge) -> str:
    """How messages name a backend: ``generator 'flux'``, ``judge 'trigscore'``."""
    kind = "generator" if isinstance(backend, Generator) else "judge"
    return f"{kind} {backend.name!r}"


def _backend_call(
    backend: Generator | Judge, call: str, method: Callable[[], T], *, in_thread: bool = False
) -> T:
    """``method()``, with an exception it was not meant to raise turned into the error that
    stops the run, named with the backend and ``call`` ("fingerprint()"), ``SystemExit``
    included, a ``KeyboardInterrupt`` let through (a Ctrl-C); ``in_thread``: it runs in a
    worker thread, whose caller names a ``SystemExit`` or ``KeyboardInterrupt``."""
    try:
        return method()
    except TrigStreamError:
        raise
    except SystemExit as exc:
        if in_thread:
            raise
        # A library calling sys.exit(), say: let out, it ended `run` and `validate` with its
        # exit code (3 reads as "run directory in use") and no word of the backend. A
        # KeyboardInterrupt goes on: in this thread it is a Ctrl-C or a stop signal (exit 130).
        raise exiting_error(exc, f"{backend_label(backend)}: its {call}") from exc
    except OSError as exc:  # this machine's: a file it cannot read, a folder not there
        raise FatalBackendError(
            f"{backend_label(backend)}: {call} failed: {describe_error(exc)}; fix what it "
            "names, then run the same command again"
        ) from exc
    except Exception as exc:  # a backend's bug: one message, not a traceback
        raise FatalBackendError(
            f"{backend_label(backend)} is broken: {call} raised {describe_error(exc)} (a fault "
            "of its code or a library it uses: fix it, or report it to its authors)"
        ) from exc


def claim_backends(backends: Sequence[Generator | Judge], owner: BackendOwner) -> None:
    """Mark these generator and judge instances in use by ``owner`` until
    :func:`release_backends`.

    An instance whose load or call an earlier engine's stop or cancel left running in a
    worker thread (:func:`~trig_stream.backends.threads.threads_left_behind`) is in use until
    that thread has ended: it closes the instance once done.

    Raises:
        ConfigError: one is in use by another open engine (the first to end would close
            it: every judgement left to the other would fail, "the judge is not open",
            and a generator would be loaded twice, then used closed), or still being
            released by such a thread.
    """
    with _backends_in_use_lock:
        for backend in backends:
            other = _backends_in_use.get(id(backend))
            kind = "generator" if isinstance(backend, Generator) else "judge"
            if other is not None:
                raise ConfigError(
                    f"{backend_label(backend)}: this instance is in use by another engine "
                    f"(run directory {other.run_dir_path}); give each engine its own {kind} "
                    "instances"
                )
            if threads_left_behind(backend):
                # Taken over now, it was loaded twice at once, or closed under this engine
                # by the thread once its load or last generate call ended.
                raise ConfigError(
                    f"{backend_label(backend)}: this instance is still being released by an "
                    "earlier engine's thread, left running by its stop or cancel (a load or "
                    "a call, which closes the instance when it ends): wait until "
                    "trig_stream.backends.base.threads_left_behind() is 0, or give this "
                    f"engine its own {kind} instance"
                )
        for backend in backends:
            _backends_in_use[id(backend)] = owner  # its run dir is known later


def release_backends(backends: Iterable[Generator | Judge]) -> None:
    """Undo :func:`claim_backends`: another engine may use these instances now."""
    with _backends_in_use_lock:
        for backend in backends:
            _backends_in_use.pop(id(backend), None)
