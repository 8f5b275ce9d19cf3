"""A scripted SMTP relay on loopback: relays as they behave in the wild, for the audit's faults and the tests.

The relay a digest goes to is outside the machine, so the audit and the tests fake it: a small SMTP server
whose replies follow a script. Greylisting (451 to RCPT for a while), permanent refusals (5xx), a connection
lost mid-DATA, a content scanner slow to answer the final dot, a tarpit that greets a byte at a time, an odd
reply to QUIT after taking the message. A script is a dict of replies by stage (``OK`` fills the rest); one
per connection (the last repeats), and per recipient (``by_recipient``: the local part of RCPT TO, one
script per session that names it, the last repeating) for the stages from RCPT on. What the relay took
(250 to the final dot) is kept in ``messages``, and in a Maildir when ``mailbox`` is given.
"""

from __future__ import annotations

import mailbox
import socketserver
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

OK = {"greeting": "220 relay ready", "ehlo": "250 relay", "mail": "250 ok", "rcpt": "250 ok", "data": "354 go on",
      "dot": "250 queued", "quit": "221 bye"}
DROP = "drop"  # as a script's "data" reply: 354, read the first line of the message, then close the connection


@dataclass
class Relay:
    """Scripted replies (module docstring); records the messages it took and the sessions it saw."""

    scripts: list[dict[str, str]]
    by_recipient: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    trickle_greeting: bool = False  # an endless greeting, a byte every 50 ms
    dot_delay_s: float = 0.0
    quit_delay_s: float = 0.0  # a relay slow to answer QUIT after taking the message (ended early by ``stop``)
    mailbox: Path | None = None
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0
    sessions: Counter[str] = field(default_factory=Counter)  # by recipient's local part: RCPTs seen
    url: str = ""
    stop: threading.Event = field(default_factory=threading.Event)  # ends every session (the relay's end)
    # a script with "hold" answers the final dot only once this is set (a relay hung after the data)
    release: threading.Event = field(default_factory=threading.Event)
    held: int = 0  # sessions holding their final dot's reply now
    lock: threading.Lock = field(default_factory=threading.Lock)

    def script_for(self, recipient: str, script: dict[str, str]) -> dict[str, str]:
        """``script`` with the recipient's own replies for this session of theirs, if it has any."""
        local = recipient.split("@", 1)[0].lower()
        with self.lock:
            seen = self.sessions[local]
            self.sessions[local] += 1
        mine = self.by_recipient.get(local)
        return {**script, **mine[min(seen, len(mine) - 1)]} if mine else script

    def took(self, message: bytes) -> None:
        with self.lock:
            self.messages.append(message)
            if self.mailbox is not None:
                box = mailbox.Maildir(self.mailbox, create=True)
                try:
                    box.add(message)
                finally:
                    box.close()


class _Session(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        relay: Relay = self.server.relay  # type: ignore[attr-defined]
        with relay.lock:
            script = {**OK, **relay.scripts[min(relay.connections, len(relay.scripts) - 1)]}
            relay.connections += 1
        if relay.trickle_greeting:
            while not relay.stop.wait(0.05):
                try:
                    self.wfile.write(b"2")
                except OSError:  # the client gave up
                    return
            return
        if script["greeting"] == "":
            relay.stop.wait(30)  # never greets
            return
        self.say(script["greeting"])
        while line := self.rfile.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.say(script["ehlo"])
            elif verb == b"MAIL":
                self.say(script["mail"])
            elif verb == b"RCPT":
                address = line.decode("ascii", "replace").partition(":")[2].strip().strip("<>")
                script = relay.script_for(address, script)
                self.say(script["rcpt"])
            elif verb == b"DATA":
                if script["data"] == DROP:
                    self.say("354 go on")
                    self.rfile.readline()
                    return  # the connection lost mid-DATA
                self.say(script["data"])
                if not script["data"].startswith("354"):
                    continue
                lines = []
                while (data_line := self.rfile.readline()) != b".\r\n":
                    if not data_line:  # the client went away mid-DATA
                        return
                    lines.append(data_line)
                body = b"".join(lines)
                relay.stop.wait(relay.dot_delay_s)  # (a relay that hangs after the data: ended by ``stop``)
                if script.get("hold"):
                    self.hold(relay)
                if script["dot"].startswith("250"):
                    relay.took(body)
                self.say(script["dot"])
            elif verb == b"QUIT":
                relay.stop.wait(relay.quit_delay_s)
                self.say(script["quit"])
                return
            else:
                self.say("250 ok")

    @staticmethod
    def hold(relay: Relay) -> None:
        """Wait for ``release`` (or ``stop``) before answering the final dot, counted in ``held`` meanwhile."""
        with relay.lock:
            relay.held += 1
        while not (relay.release.wait(0.05) or relay.stop.is_set()):
            pass
        with relay.lock:
            relay.held -= 1

    def say(self, reply: str) -> None:
        self.wfile.write(reply.encode() + b"\r\n")


@contextmanager
def running(relay: Relay) -> Iterator[Relay]:
    """Serve ``relay`` on a free loopback port (its ``url`` set) until the block ends; every session ends then."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Session)  # server_close joins the sessions
    server.relay = relay  # type: ignore[attr-defined]
    relay.url = f"smtp://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-relay", daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        relay.stop.set()
        server.shutdown()
        server.server_close()
