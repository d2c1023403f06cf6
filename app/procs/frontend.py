"""One HTTP front end of ``unetseg serve --workers N``: the whole service of ``create_app`` on its own listening
socket, one of the front ends' SO_REUSEPORT group on the service's port (the kernel hands each new connection
to one of them), its models in the engine process (``UNETSEG_ENGINE_SOCKET``). No torch is loaded here.

    python -m app.procs.frontend --fd FD [--grace S]      (started by the supervisor; settings: UNETSEG_*)
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

from app import serving
from app.config import Settings
from app.logs import configure_logging
from app.main import create_app


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.procs.frontend", description="A front end of serve --workers.")
    p.add_argument("--fd", type=int, required=True, help="the listening socket, inherited from the supervisor")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    args = p.parse_args(argv)
    settings = Settings()
    if not settings.engine_socket:
        p.error("UNETSEG_ENGINE_SOCKET must name the engine process's socket")
    configure_logging(settings.log_format, settings.log_level)
    sock = socket.socket(fileno=args.fd)
    serving.run(create_app(settings), settings, args.grace, sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
