"""Real store backends for the tests: throwaway PostgreSQL databases and an S3 emulator on 127.0.0.1.

PostgreSQL is the server `.ci/run` installs and starts (reached as UNETSEG_TEST_POSTGRES_URL, by default
the superuser over TCP with the password `.ci/run` sets); tests that stop the database start a server of
their own from the same installation (``private_postgres``). Tests that need it skip when none is reachable,
except in CI (CI=true), where a missing server fails them. S3 is moto's server mode (an emulator of the
S3 API), started in this process on a free port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

ADMIN_URL = os.environ.get("UNETSEG_TEST_POSTGRES_URL", "postgresql://postgres:unetseg@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() == "true"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def unavailable(reason: str) -> None:
    """Skip, or fail in CI, where every backend must be tested."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the backend must be available)")
    pytest.skip(reason)


def postgres_admin() -> Any:
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed (pip install -e '.[dev]')")
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        parts = urlsplit(ADMIN_URL)
        where = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))  # without the password
        unavailable(f"no PostgreSQL at {where} ({str(exc).strip().splitlines()[0]}); `bash .ci/run` starts one")


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty database with a random name; its URL. Dropped afterwards."""
    admin = postgres_admin()
    name = f"unetseg_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        parts = urlsplit(ADMIN_URL)
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@contextmanager
def s3_emulator() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 and a free port; its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        unavailable("moto is not installed (pip install -e '.[dev]')")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"unetseg-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=name)
    client.close()
    return name


class PrivatePostgres:
    """A PostgreSQL server of one test's own, in a temporary folder on a free port on 127.0.0.1, which the
    test may stop (as a crash would: ``-m immediate``) and start again without touching anyone else's.

    Run as the ``postgres`` user when the tests run as root (PostgreSQL refuses root), as CI does."""

    def __init__(self, bindir: Path, root: Path, port: int) -> None:
        self.bindir, self.root, self.port = bindir, root, port
        self.data = root / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(cmd)}: {done.returncode} {done.stdout}{done.stderr}{log[-2000:]}")

    def init(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        """Returns once the server accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "server.log")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        """As a crash: every backend is gone at once, open connections are cut."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not versions:
        unavailable("no PostgreSQL server binaries in /usr/lib/postgresql (`bash .ci/run` installs them)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        unavailable("running as root without runuser: cannot start PostgreSQL as the postgres user")
    root = Path(tempfile.mkdtemp(prefix="unetseg-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = PrivatePostgres(versions[-1].parent, root, port)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
