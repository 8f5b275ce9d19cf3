"""aiosmtpd's SMTP session without two per-connection costs of its own (issue 17: the sender's wait).

aiosmtpd 1.4 runs both on the event loop, so every sender waits for them:

- ``SMTP.__init__`` builds its command and AUTH tables by walking ``dir(self)`` and
  ``inspect.getmembers(self)``, over a hundred attributes, for every connection.
  ``LeanSMTP.__dir__`` lists only the attributes those tables keep (``smtp_*`` and ``auth_*``),
  once per class, so the tables come out the same.
- ``SMTP._getaddr`` (MAIL FROM and RCPT TO) defines a ``typing.Protocol`` class on every call
  and runs the email package's address parser. ``LeanSMTP`` parses with the same parser, once
  per distinct argument (senders repeat their addresses), and keeps aiosmtpd's local-part limit.

Notebook 08 measures the gateway alone both ways (``[gateway] lean_sessions``).

One difference, on purpose: the email package's parser raises IndexError, AttributeError or even
UnboundLocalError on some truncated addresses (``MAIL FROM:<a@``, ``"``, ``<a@[``, ``<ü@[ ``).
aiosmtpd lets them escape, and the session answered ``451`` (try again later) to an address that will
never parse, so a real MTA would retry it for days. Here it is malformed like any other: ``553 5.1.3``.
"""

from __future__ import annotations

import functools
from email._header_value_parser import get_addr_spec, get_angle_addr

from aiosmtpd.smtp import SMTP

# The attribute prefixes aiosmtpd's SMTP.__init__ builds its tables from (1.4: smtp_* commands, auth_* mechanisms).
INTROSPECTED_PREFIXES = ("smtp_", "auth_")
ADDRESS_CACHE_SIZE = 4096
_INTROSPECTED: dict[type, list[str]] = {}  # per session class: its attributes with those prefixes


class LeanSMTP(SMTP):
    """aiosmtpd's SMTP with a short ``dir()`` and a cached address parser (module docstring). A session with
    ``lean`` False behaves as aiosmtpd's own: the baseline of ``[gateway] lean_sessions``."""

    lean = True

    def __dir__(self) -> list[str]:
        """List only the command and AUTH methods: what aiosmtpd introspects on every connection."""
        if not self.lean:
            return list(super().__dir__())
        cls = type(self)
        if cls not in _INTROSPECTED:
            _INTROSPECTED[cls] = [name for name in dir(cls) if name.startswith(INTROSPECTED_PREFIXES)]
        return _INTROSPECTED[cls]  # dir() returns a sorted copy

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's ``_getaddr``: (address, the rest of the argument), or (None, None) if it does not parse
        or its local part is over ``local_part_limit``."""
        if not self.lean:
            return super()._getaddr(arg)
        address, rest = parse_address(arg)
        if address and self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest


@functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def parse_address(arg: str) -> tuple[str | None, str | None]:
    """An SMTP command's address argument as aiosmtpd parses it: ``("", "")`` when empty, ``(None, None)``
    when it does not parse (including the parser's own errors on truncated input), else (address, the rest:
    ESMTP parameters)."""
    if not arg:
        return "", ""
    try:
        address, rest = get_angle_addr(arg) if arg.lstrip().startswith("<") else get_addr_spec(arg)
        return address.addr_spec, rest
    except Exception:  # HeaderParseError, and on truncated input IndexError, AttributeError, UnboundLocalError...
        return None, None
