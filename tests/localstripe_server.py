"""Serve localstripe on 127.0.0.1 only, with its on-disk state turned off.

localstripe (a test-only dependency) is a stateful fake of the Stripe API. Its own command
listens on every interface and rewrites a fixed file under /tmp on every write; this launcher
serves the same application on loopback, on the given port (0: any free one), and prints
``LISTENING <port>`` once it accepts connections. Stop it by its PID.
"""

from __future__ import annotations

import argparse
import socket


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    from aiohttp import web
    from localstripe import resources
    from localstripe.server import app

    # Keep every run's state in memory: nothing shared through /tmp between runs.
    resources.Store.dump_to_disk = lambda self: None

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)  # noqa: T201 - the parent reads it
    web.run_app(app, sock=sock, access_log=None, print=None)


if __name__ == "__main__":
    main()
