"""Which Host headers a local web server answers (shared by `rlhfkit serve` and `rlhfkit label`).

A web page can point its own domain at this machine (DNS rebinding) and then call a server here
as same-origin; its requests carry that domain as Host, so a server admits only names it knows.
No torch or web framework here: the labelling app imports this without the model stack.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

LOOPBACK = ("127.0.0.1", "localhost")
WILDCARD = ("0.0.0.0", "::", "")  # listen on every address: the names it is reached by are unknown
_NAME = re.compile(r"\*|(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


def is_loopback(host: str) -> bool:
    """True for `localhost` and any loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_pattern(name: str) -> str:
    """``name`` as it appears in a Host header (lower case, IPv6 in brackets); ValueError if malformed."""
    name = name.strip().lower()
    if ":" in name:  # an IPv6 address, bare or in brackets; a port is refused here too
        try:
            return f"[{ipaddress.IPv6Address(name.strip('[]'))}]"
        except ValueError:
            pass
    elif _NAME.fullmatch(name):
        return name
    raise ValueError(f"{name!r} is not a host name or address (e.g. labels.example.com, *.example.com, "
                     "10.0.0.5; no port)")


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> list[str] | None:
    """Host header names to accept for a server listening on ``bind``; None: accept any.

    Loopback names are always safe (a rebinding page cannot send them), then the bind address
    and ``extra``. A wildcard bind with no ``extra`` has no names to check against.
    """
    names = [host_pattern(name) for name in extra]
    if bind in WILDCARD and not names:
        return None
    if bind not in WILDCARD:
        names.insert(0, host_pattern(bind))
    return list(dict.fromkeys([*LOOPBACK, *names]))
