"""The exceptions trig-stream raises.

Everything the package raises on purpose derives from :class:`TrigStreamError`::

    TrigStreamError
    ├── ConfigError              a config file is unreadable or invalid (names file, key, line)
    │   └── ConfigWriteError     a converted config cannot be written where it goes
    ├── DatasetError             the dataset as a whole cannot be read (one bad record is data)
    │   └── DatasetInterrupted   its reading was cut short (a SIGINT reached polars)
    ├── RunDirError              the run directory cannot be used
    │   ├── RunLockedError       another process is running in it
    │   └── FingerprintMismatch  its results were made with different settings
    ├── MissingExtraError        an optional dependency is not installed (names the pip command)
    └── BackendError             raised by a generator or judge backend
        ├── RetryableError       worth another attempt (5xx, timeout, reset); may carry retry_after
        │   ├── RateLimitError   the server said 429
        │   └── UnreachableError no answer at all: no connection, a reset, none in time
        │       └── AnswerTimeoutError  none in time (a sign of load, for adaptive concurrency)
        ├── ItemError            this item failed for good (4xx, refusal); the run goes on
        │   ├── NotFoundError    the server said 404 (fatal before any call has succeeded)
        │   └── NotAsked         a stop came before it was asked for: owed to the resume
        └── FatalBackendError    nothing will work (bad credentials, unusable device): the run stops

Per-item failures never escape the engine as exceptions: they become judgements whose status is
``error`` or ``unscorable``, with the reason, and never a score.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class TrigStreamError(Exception):
    """Base class of every error trig-stream raises on purpose."""


class ConfigError(TrigStreamError):
    """A config file cannot be read or does not validate."""


class ConfigWriteError(ConfigError):
    """``import-config`` cannot write the converted config (its ``-o`` file, or standard
    output): no permission, a full disk, a file where a folder of its path should be. The
    output's fault, not the input's, so the command exits as for an unwritable run directory
    (3), as ``report`` does for its own output."""


class DatasetError(TrigStreamError):
    """The dataset cannot be opened at all (missing file, unreadable format)."""


class DatasetInterrupted(DatasetError):
    """The dataset's reading ended before its end: polars, which hooks SIGINT itself, ends a
    parquet read that a SIGINT (Ctrl-C) interrupts as if its files ended there. A run that
    is stopping takes it as its stop; anywhere else it is an error, never the dataset's end."""


class RunDirError(TrigStreamError):
    """The run directory cannot be used."""


class RunLockedError(RunDirError):
    """Another process holds the run directory's lock."""


class FingerprintMismatch(RunDirError):
    """The run directory holds results made with settings that differ from the config."""


TORCH_ON_THE_CPU = (
    "without a GPU, install torch's CPU build first, as PyPI's is a multi-GB CUDA one: "
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
)
"""How a machine without a GPU gets torch's CPU build before the extra that brings torch (the
README's Installing by hand)."""


class MissingExtraError(TrigStreamError, ImportError):
    """An optional dependency is missing; the message names the install command."""

    def __init__(self, package: str, extra: str) -> None:
        message = f"{package} is not installed; install it with: pip install 'trig-stream[{extra}]'"
        if extra == "diffusers":  # the extra that brings torch
            message += f" ({TORCH_ON_THE_CPU})"
        super().__init__(message)
        self.package = package
        self.extra = extra


def require_installed(packages: Iterable[str], extra: str) -> None:
    """Check that ``packages`` are installed, without importing them (seconds for torch).

    Raises:
        MissingExtraError: the first of them that is not, naming ``extra``, which brings it.
    """
    for package in packages:
        try:
            missing = importlib.util.find_spec(package) is None
        except ValueError:  # imported already, without a spec (a host's stand-in module)
            missing = sys.modules.get(package) is None
        if missing:
            raise MissingExtraError(package, extra)


class BackendError(TrigStreamError):
    """Raised by a generator or judge backend to classify a failure."""


class RetryableError(BackendError):
    """A transient failure; the engine retries it with backoff.

    Args:
        message: what went wrong.
        retry_after: seconds the server asked us to wait, when it said so.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitError(RetryableError):
    """The server refused for load (HTTP 429)."""


class UnreachableError(RetryableError):
    """No answer from the server at all: a refused, reset or dropped connection, or none
    within the timeout. Any other failure is an answer: the server is there. A judge (or an
    API) that has answered nothing yet and spends a request's retries on this is down, at
    another address, or (timing out) slower than its timeout allows, so the run stops and
    its message says which it can tell."""


class AnswerTimeoutError(UnreachableError):
    """No whole answer within the request's timeout: unlike a refused or reset connection,
    a sign that the server has more than it can do in time, which adaptive concurrency
    answers by lowering the limit."""


class ItemError(BackendError):
    """This one item failed and retrying will not help; the run goes on.

    Args:
        message: what went wrong.
        server_said: when the failure is a server's answer, its own error code and message
            (without the endpoint or anything else of ours around them), for a backend that
            tells a content filter's refusal from the rest by what the server said.
    """

    def __init__(self, message: str = "", *, server_said: str = "") -> None:
        super().__init__(message)
        self.server_said = server_said


class NotFoundError(ItemError):
    """An API answered HTTP 404: no such path (a base URL without its ``/v1``) or no such
    model. Before any call to that API has succeeded it is the config's fault, and the
    backend stops the run instead (every call would fail the same way); after one has, it is
    this item's."""

    def before_any_success(
        self, api: str = "", model: str | None = None, *, check: str | None = None
    ) -> FatalBackendError:
        """The error that stops the run when this 404 came before any success; ``api`` (e.g.
        "the images API of generator 'x'") and ``model`` name what to check, and ``check``
        what to check beside ``model`` instead of ``base_url`` (a server the run started has
        none)."""
        where = f"{api} answered " if api else ""
        named = f" ({model!r})" if model else ""
        check = check or "base_url (an OpenAI-protocol server's usually ends in /v1)"
        return FatalBackendError(
            f"{where}{self}; nothing sent there has succeeded yet: check {check} and model{named}"
        )


class NotAsked(ItemError):
    """A generator or judge did not ask for this item because the run is stopping (a graceful
    stop ended the wait for a retry, see
    :meth:`~trig_stream.backends.base.Generator.stop_waiting`, or a judge request's wait for
    its turn, see :meth:`~trig_stream.backends.base.Judge.stop_waiting`): the run records
    nothing for it, and a resume asks for it. Outside a stop it is the item's failure, as any
    :class:`ItemError`."""


class FatalBackendError(BackendError):
    """The backend cannot work at all (bad credentials, no such device); the run stops.

    Args:
        message: what went wrong.
        request_error: the failure of the request that raised it, when that request's own
            failure is what showed that none will work (the last of several refusals in a
            row): the engine records it as that request's ``error`` judgement, as it did the
            ones before it, and then stops the run.
    """

    def __init__(self, message: str = "", *, request_error: ItemError | None = None) -> None:
        super().__init__(message)
        self.request_error = request_error


def leaf_errors(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    """Every exception inside a (nested) exception group, as a task group raises them."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from leaf_errors(exc)
        else:
            yield exc


def validation_problems(exc: ValidationError) -> list[str]:
    """Each problem pydantic found, as ``where: what``: the dotted place (a dict key's marker
    left out) and the message (without pydantic's ``Value error,`` before our own)."""
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"] if part != "[key]")
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return problems
