"""Which Ray cluster a run uses, and finding out fast when it is not there.

Without an address a run starts a private local cluster: Ray's own default would join
whatever head the `ray_current_cluster` file of an earlier `ray start` names, and wait
without end when that head is gone. `auto` joins the running local cluster; any other
address is checked for an answer, for at most CONNECT_TIMEOUT_S, before Ray is asked.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

CONNECT_TIMEOUT_S = 30.0


class ClusterError(RuntimeError):
    """The cluster to join cannot be reached; the message names it and the fix."""


def resolve(address: str | None) -> str:
    """`local`, or the address of a cluster that answers. A Jobs-API driver gets RAY_ADDRESS."""
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        return address
    if address == "auto":
        from ray._private.services import find_bootstrap_address

        # The head the last `ray start` on this machine recorded (in Ray's temp folder).
        found = find_bootstrap_address(None)
        if not found:
            raise ClusterError(
                "--address auto: no Ray cluster was started on this machine; start one with `ray start --head`, "
                "or drop --address to run on a private local cluster"
            )
        address = found
    _wait_for_answer(address.removeprefix("ray://"))
    return address


def _wait_for_answer(host_port: str) -> None:
    timeout = CONNECT_TIMEOUT_S  # read when called, not when defined: a unit test shortens it
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {host_port} is not HOST:PORT (or auto); e.g. --address 10.0.0.10:6379")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"the Ray cluster at {host_port} does not answer ({exc.strerror or exc}) after {timeout:.0f} s; "
                    "check the address and that its head is running, or drop --address to run on a private "
                    "local cluster"
                ) from None
        time.sleep(1.0)


def connect(address: str | None, local_resources: dict[str, float] | None = None, **init: Any) -> None:
    """`local_resources`: custom resources a private local cluster declares (a running
    cluster's are its own)."""
    import ray

    if ray.is_initialized():  # an embedding program (or a test) chose its cluster already
        return
    resolved = resolve(address)
    local = {"include_dashboard": False, "resources": local_resources or None} if resolved == "local" else {}
    # Ray's notes on starting and connecting (token auth on, "Started a local Ray instance") are
    # not the user's business on every run; errors still show.
    ray.init(address=resolved, logging_level=logging.ERROR, **local, **init)
