"""Is something listening on a local port? Asked without connecting.

Connecting again and again to a port in the ephemeral range (50051-50054 are) before
its server is up can make the kernel pick that very port as the source: the socket
connects to itself and the server then fails with "address already in use". Reading
the kernel's socket table instead of connecting avoids that.
"""

from __future__ import annotations

import contextlib
import socket

_LISTEN = "0A"


def listening(port: int) -> bool:
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                found_table = True
                next(lines)
                for line in lines:
                    fields = line.split()
                    if fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    if found_table:
        return False
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False
