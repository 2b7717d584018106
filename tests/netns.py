"""Hosts of the tests' own: network namespaces joined to this machine by veth pairs.

A worker started in a ``Host`` reaches this machine only through the host's
links, each a veth pair with a /30 of its own in 10.213.0.0/16: this machine
holds the ``.1`` address, the host the ``.2``. Taking a link down drops its
packets silently, in both directions, as a dead link or switch port: no FIN,
no RST, no ``CLIENT KILL``. Needs root and iproute2's ``ip``; a test that
cannot make its host fails saying so.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


@dataclass
class Link:
    """One veth pair: this machine's end and address, the host's address."""

    outside: str  # the interface on this machine
    address: str  # this machine's address on the link (the host reaches services here)
    host_address: str


@dataclass
class Host:
    """A network namespace with links to this machine; processes run in it through ``command``."""

    name: str
    links: dict[str, Link] = field(default_factory=dict)

    def command(self, *argv: str) -> list[str]:
        """``argv`` run in this host (``ip netns exec`` execs it: the PID is the command's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def down(self, link: str) -> None:
        """Take ``link`` down: from now on its packets are dropped, both ways."""
        _ip("link", "set", self.links[link].outside, "down")

    def up(self, link: str) -> None:
        _ip("link", "set", self.links[link].outside, "up")

    def kill_all(self) -> None:
        """SIGKILL every process in this host, as a host that loses power."""
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def route(self, address: str, link: str) -> None:
        """Reach ``address`` on this machine through ``link`` (see ``shared_address``)."""
        _ip("netns", "exec", self.name, "ip", "route", "add", f"{address}/32",
            "via", self.links[link].address)


@contextlib.contextmanager
def shared_address() -> Iterator[str]:
    """An address of this machine that every host can reach by the same name, through its
    own link (``Host.route``), as a fleet's hosts reach one database server by one name;
    a host whose link is down cannot reach it."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    address = next(f"10.212.0.{n}" for n in range(1, 255) if f"10.212.0.{n}/" not in used)
    _ip("addr", "add", f"{address}/32", "dev", "lo")
    try:
        yield address
    finally:
        subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], capture_output=True)


@contextlib.contextmanager
def host(*links: str) -> Iterator[Host]:
    """A host with the named links to this machine; its processes killed and it removed after."""
    if shutil.which("ip") is None:
        pytest.fail("iproute2's `ip` is not on PATH: the test makes network namespaces with it "
                    "(apt-get install iproute2)", pytrace=False)
    made = Host(f"asyncsql-{uuid.uuid4().hex[:8]}")
    _ip("netns", "add", made.name)
    try:
        _ip("netns", "exec", made.name, "ip", "link", "set", "lo", "up")
        for number, name in enumerate(links):
            made.links[name] = _link(made.name, number)
        yield made
    finally:
        _remove(made)


def _link(namespace: str, number: int) -> Link:
    base = _free_subnet()
    outside, inside = f"{namespace[-8:]}o{number}", f"{namespace[-8:]}i{number}"
    link = Link(outside, f"10.213.{base >> 6}.{(base & 63) * 4 + 1}",
                f"10.213.{base >> 6}.{(base & 63) * 4 + 2}")
    _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", namespace)
    _ip("addr", "add", f"{link.address}/30", "dev", outside)
    _ip("link", "set", outside, "up")
    _ip("netns", "exec", namespace, "ip", "addr", "add", f"{link.host_address}/30",
        "dev", inside)
    _ip("netns", "exec", namespace, "ip", "link", "set", inside, "up")
    return link


def _free_subnet() -> int:
    """A /30 of 10.213.0.0/16 that no interface of this machine uses (16,384 to pick from)."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    while True:
        base = random.randrange(1 << 14)
        if f"10.213.{base >> 6}.{(base & 63) * 4 + 1}/" not in used:
            return base


def _remove(made: Host) -> None:
    made.kill_all()
    for link in made.links.values():
        subprocess.run(["ip", "link", "del", link.outside], capture_output=True)
    subprocess.run(["ip", "netns", "del", made.name], capture_output=True)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"`ip {' '.join(args)}` failed: {done.stderr.strip()} (the test makes "
                    "network namespaces and veth pairs: it needs root)", pytrace=False)


@contextlib.contextmanager
def forward(address: str, port: int, target: tuple[str, int]) -> Iterator[None]:
    """Forward ``address:port`` on this machine to ``target`` (socat), for a host to reach
    a service that listens on 127.0.0.1 only; stopped by its PID."""
    from tests.celery_suite.run import server

    if shutil.which("socat") is None:
        pytest.fail("socat is not on PATH: the test forwards a service to its hosts with it "
                    "(apt-get install socat)", pytrace=False)
    command = ["socat", f"TCP-LISTEN:{port},bind={address},reuseaddr,fork",
               f"TCP:{target[0]}:{target[1]}"]
    with server(command, port, f"socat forwarder to {target[0]}:{target[1]}",
                fail=lambda message: pytest.fail(message, pytrace=False), address=address):
        yield
