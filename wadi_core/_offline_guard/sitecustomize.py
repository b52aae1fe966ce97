"""Block network access in an offline run (``python -m wadi_core.reproduce --block-network``).

Python imports ``sitecustomize`` at start-up from the first directory on ``sys.path`` that holds one, so putting
this directory first on ``PYTHONPATH`` guards every interpreter started under it, the Jupyter kernels included.
Connections to a non-loopback destination raise ``OSError`` before any name lookup or packet is sent; loopback
(127.0.0.0/8, ::1, ``localhost``) and Unix sockets keep working, so the kernel can still talk to papermill.
"""

from __future__ import annotations

import ipaddress
import socket

_LOCAL_NAMES = ("localhost", "localhost.", "ip6-localhost")


def _is_local(host: object) -> bool:
    """True for a loopback or unspecified address (or ``localhost``); names that need a lookup are not."""
    if host is None:  # getaddrinfo(None, port): the local wildcard address
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).split("%", 1)[0]  # drop an IPv6 scope id
    if host == "" or host.lower() in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


def _check(family: int, address: object) -> None:
    if family == getattr(socket, "AF_UNIX", None) or not isinstance(address, tuple):
        return  # Unix sockets and other non-IP endpoints are local
    if not _is_local(address[0]):
        raise OSError(f"network access blocked in an offline run: {address[0]}")


def _guard_connect(connect):
    def guarded(self, address):
        _check(self.family, address)
        return connect(self, address)

    return guarded


def _guard_sendto(sendto):
    def guarded(self, data, *args):
        _check(self.family, args[-1])  # sendto(data, address) or sendto(data, flags, address)
        return sendto(self, data, *args)

    return guarded


def _guard_getaddrinfo(getaddrinfo):
    def guarded(host, *args, **kwargs):
        if not _is_local(host):
            raise OSError(f"network access blocked in an offline run: {host}")
        return getaddrinfo(host, *args, **kwargs)

    return guarded


def _guard_create_connection(create_connection):
    def guarded(address, *args, **kwargs):
        if not _is_local(address[0]):
            raise OSError(f"network access blocked in an offline run: {address[0]}")
        return create_connection(address, *args, **kwargs)

    return guarded


def install() -> None:
    """Patch :mod:`socket` once per interpreter."""
    if getattr(socket, "_wadi_offline_guard", False):
        return
    socket.socket.connect = _guard_connect(socket.socket.connect)
    socket.socket.connect_ex = _guard_connect(socket.socket.connect_ex)
    socket.socket.sendto = _guard_sendto(socket.socket.sendto)
    socket.getaddrinfo = _guard_getaddrinfo(socket.getaddrinfo)
    socket.create_connection = _guard_create_connection(socket.create_connection)
    socket._wadi_offline_guard = True


install()
