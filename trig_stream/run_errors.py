"""Which exception leaves an :class:`~trig_stream.engine.Engine`'s ``async with`` block when
the run fails.

The engine's stages run in anyio task groups, which raise what their tasks raised as an
exception group. A caller wants the one error that ended the run (a
:class:`~trig_stream.errors.TrigStreamError`: bad credentials, an unreadable dataset), not the
group; and when its own block raised as well, it wants that exception kept, not dropped with
the group. :func:`error_leaving` decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from trig_stream.errors import TrigStreamError, leaf_errors
from trig_stream.pipeline import describe_error


@dataclass(frozen=True, slots=True)
class Leaving:
    """What leaves the block, out of the task group's exception group."""

    blocks_own: bool = False
    """Every exception in the group is the block's own: it leaves as the block raised it."""
    error: BaseException | None = None
    """The run's one error, to leave the block alone; None: the group leaves as it is (several
    different failures, none of them ours)."""
    keeps_context: bool = False
    """The block's own exception would be lost with the group: ``error`` carries a note naming
    it, and leaves with it as its context."""


def error_leaving(group: BaseExceptionGroup, exc: BaseException | None) -> Leaving:
    """What leaves the ``async with`` block, given the task group's ``group`` and the block's
    own exception ``exc`` (None when the block ended without one)."""
    leaves = list(leaf_errors(group))
    own = {id(leaf) for leaf in _leaves_of(exc)}
    if exc is not None and all(id(leaf) in own for leaf in leaves):
        return Leaving(blocks_own=True)
    error: BaseException | None = next((e for e in leaves if isinstance(e, TrigStreamError)), None)
    if error is None:
        # One failure (an injected sleep that raised, in each task that called it) comes out
        # as itself, not in the groups of every task group it crossed.
        cancelled = anyio.get_cancelled_exc_class()
        failures = [e for e in leaves if not isinstance(e, cancelled)]
        if len({(type(e), str(e)) for e in failures}) != 1:
            return Leaving()
        error = failures[0]
    if not _lost_to(error, exc):
        return Leaving(error=error)
    # The block's own exception (its cleanup failed as the run did) would be dropped with the
    # group: it stays, as the context of the error that leaves.
    assert exc is not None
    error.add_note(
        "The `async with` block raised an exception of its own as the run failed, "
        f"shown above as this error's context: {describe_error(exc)}"
    )
    return Leaving(error=error, keeps_context=True)


def _lost_to(error: BaseException, exc: BaseException | None) -> bool:
    """Whether ``exc``, the ``async with`` block's own exception, would be lost if the run's
    ``error`` left the block alone: it is one, not a cancellation, and not ``error``."""
    if exc is None or isinstance(exc, anyio.get_cancelled_exc_class()):
        return False
    return all(leaf is not error for leaf in _leaves_of(exc))


def _leaves_of(exc: BaseException | None) -> list[BaseException]:
    if exc is None:
        return []
    if isinstance(exc, BaseExceptionGroup):
        return list(leaf_errors(exc))
    return [exc]
