"""Addresses a managed judge server listens at: a port free at every address of its host, and
whether two servers' hosts clash (:mod:`trig_stream.backends.judges.managed_server`)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from typing import Any

FREE_PORT_TRIES = 20
"""Ports free at a host's first address tried, each taken at another of its addresses,
before ``port = 0`` gives up."""
NOT_AN_ADDRESS_HERE = frozenset({errno.EADDRNOTAVAIL, errno.EINVAL, errno.EAFNOSUPPORT})
"""How a bind says its address is none of this machine's: another machine's, a link-local IPv6
one without an interface (``fe80::1``: EINVAL), an IPv6 one where this machine has no IPv6."""


def free_port(host: str) -> int:
    """A TCP port free now at every address ``host`` names (``localhost``: ::1 and
    127.0.0.1, either of which the server may listen at and the probe reach), each bound a
    moment; one that is no address of this machine (::1 where IPv6 is off) is passed over
    while another is.

    Raises:
        OSError: ``host`` does not resolve (:class:`socket.gaierror`), names no address of
            this machine, or each of :data:`FREE_PORT_TRIES` ports free at its first
            address was taken at another.
    """
    addresses = [
        (family, address)
        for family, _, _, _, address in socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    ]
    for _ in range(FREE_PORT_TRIES):
        port = _free_at_each(addresses)
        if port is not None:
            return port
    raise OSError(errno.EADDRINUSE, f"no port free at every address of {host}")


def _free_at_each(addresses: Sequence[tuple[socket.AddressFamily, tuple[Any, ...]]]) -> int | None:
    """The port the first bindable address of ``addresses`` picks, if free at the others
    too; None if one of them has it taken.

    Raises:
        OSError: a bind failed otherwise, or every address is none of this machine's.
    """
    port = 0
    not_here: OSError | None = None
    for family, address in addresses:
        try:
            with listening_socket(family) as sock:
                sock.bind((address[0], port, *address[2:]))
                port = int(sock.getsockname()[1])
        except OSError as exc:
            if exc.errno in NOT_AN_ADDRESS_HERE:
                not_here = exc
                continue
            if port and exc.errno == errno.EADDRINUSE:
                return None
            raise
    if not port:
        raise not_here or OSError(errno.EADDRNOTAVAIL, "no address")
    return port


def listening_socket(family: socket.AddressFamily) -> socket.socket:
    """An unbound TCP socket of ``family``, set up as a server sets up its own.

    ``SO_REUSEADDR`` as servers set it (uvicorn, aiohttp): a bind then fails only where a socket
    listens, not where closed connections linger in TIME_WAIT.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def hosts_overlap(first: str, second: str) -> bool:
    """Whether servers listening on ``first`` and ``second`` (at one port) would clash.

    Each host is resolved to its addresses (``127.1`` is ``127.0.0.1``, a host name the
    addresses it stands for, an IPv6 address however written); hosts that resolve to a
    common address, or where one is a wildcard covering the other, clash; so do hosts whose
    spelling says so (``localhost`` and a loopback address). A host that does not resolve is
    compared by its spelling alone (the run reports it as no address of this machine).
    """
    if _spellings_overlap(first, second):
        return True  # localhost and ::1 too, where localhost resolves to 127.0.0.1 alone
    first_addresses, second_addresses = _addresses(first), _addresses(second)
    if first_addresses is None or second_addresses is None:
        return False
    if first_addresses & second_addresses or "::" in first_addresses | second_addresses:
        return True
    for one, other in ((first_addresses, second_addresses), (second_addresses, first_addresses)):
        if "0.0.0.0" in one and any(":" not in address for address in other):
            return True  # every IPv4 address
    return False


def _addresses(host: str) -> set[str] | None:
    """The addresses ``host`` stands for, each as the system writes it; None if it does not
    resolve."""
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return {str(info[4][0]).split("%")[0] for info in found}


def _spellings_overlap(first: str, second: str) -> bool:
    """:func:`hosts_overlap` by the hosts' spelling alone."""
    first, second = first.lower(), second.lower()
    if first == second or "::" in (first, second):
        return True
    if "0.0.0.0" in (first, second):
        other = second if first == "0.0.0.0" else first
        return ":" not in other  # an IPv4 address or a host name
    if "localhost" in (first, second):
        other = second if first == "localhost" else first
        return other in ("127.0.0.1", "::1")
    return False
