"""uvicorn's HTTP protocol with Nagle's algorithm off on every connection.

With ``--workers`` above 1, uvicorn (0.54) binds the listening socket itself as
``socket.socket(family)``, whose protocol number is 0; asyncio sets ``TCP_NODELAY`` only on
sockets whose protocol is ``IPPROTO_TCP``, so the accepted connections keep Nagle's algorithm.
A response written in two pieces (headers, then body) then waits for the client's delayed ACK:
about 40 ms per request on a kept-alive connection, which is how MLflow's client and most HTTP
clients talk (measured: 44 ms per ``GET /health`` of `mlflow server` with 2 workers, 1.6 ms
with 1). This protocol sets ``TCP_NODELAY`` when a connection is made, and otherwise is
uvicorn's own (httptools where installed, else h11).

``mlops serve`` runs its workers with it, and ``mlops server`` passes it to `mlflow server`
through ``--uvicorn-opts "--http mlops.serving.nodelay:NoDelayProtocol"``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

IMPORT_PATH = "mlops.serving.nodelay:NoDelayProtocol"


class NoDelayProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        nodelay(transport)
        super().connection_made(transport)


def nodelay(transport: Any) -> None:
    """``TCP_NODELAY`` on the transport's TCP socket (nothing for any other kind)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # a socket that does not take it: as uvicorn would have served it
            pass
