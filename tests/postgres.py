"""A throwaway PostgreSQL server for tests: initdb in a temporary folder, loopback only, stopped at the end.

The tests that run Tiled on PostgreSQL need a real server, not a mock: Tiled's catalog uses
PostgreSQL-only SQL (JSONB, its own migrations). Debian's package puts the binaries in
``/usr/lib/postgresql/<version>/bin``, off ``PATH``; the Makefile's ``test`` target installs it
where it can. ``postgres`` refuses to run as root, so as root the server runs as the ``postgres``
system user on a folder handed to it. TCP connections need a password (as at a facility: the
password travels in ``PGPASSWORD``, never in the URI), the unix socket in the folder trusts its
owner, which is how the database is created.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

from tiled_servers import free_port

DATABASE = "tiled"
SUPERUSER = "postgres"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed here or would not start; the message says which, for ``pytest.skip``."""


class PostgresServer(NamedTuple):
    """A running server: ``uri`` (no password) for Tiled, ``password`` for ``PGPASSWORD``."""

    uri: str
    password: str
    port: int
    directory: Path


def find_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: on ``PATH``, else the newest Debian version's."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: _version(p.parent.parent.name))
    return versions[-1].parent if versions else None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def start_postgres() -> PostgresServer:
    """initdb, start on 127.0.0.1 on a free port with the socket in the folder, create ``tiled``.

    Raises :class:`PostgresUnavailable` when the binaries are missing or a step fails; whatever
    was started by then is stopped and the folder removed.
    """
    bin_dir = find_binaries()
    if bin_dir is None:
        raise PostgresUnavailable(
            "PostgreSQL is not installed (no pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
            "`make test` installs Debian's package when run as root"
        )
    as_user = _run_as()
    # Not under pytest's basetemp, which is private to its owner: the server may run as another user.
    # Short, too: the socket's path must fit in 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="ptychonn-pg-", dir="/tmp" if as_user else None))
    password = secrets.token_hex(16)
    (directory / "pwfile").write_text(password + "\n")
    if as_user is not None:
        for path in (directory, directory / "pwfile"):
            os.chown(path, as_user.pw_uid, as_user.pw_gid)
    data, port = directory / "data", free_port()
    initdb = ("-D", data, "-U", SUPERUSER, "--pwfile", directory / "pwfile", "-E", "UTF8", "--no-sync")
    auth = ("--auth-local=trust", "--auth-host=scram-sha-256")  # the socket is in a folder only we can enter
    server = f"-h 127.0.0.1 -p {port} -k {directory} -F"  # -F: no fsync, a throwaway database
    start = ("-D", data, "-l", directory / "server.log", "-o", server, "-w", "start")
    try:
        _run(as_user, directory, bin_dir / "initdb", *initdb, *auth)
        _run(as_user, directory, bin_dir / "pg_ctl", *start)
        _run(as_user, directory, bin_dir / "createdb", "-h", directory, "-p", port, "-U", SUPERUSER, DATABASE)
    except PostgresUnavailable:
        stop_postgres(directory)
        raise
    uri = f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
    return PostgresServer(uri=uri, password=password, port=port, directory=directory)


def stop_postgres(directory: Path) -> None:
    """``pg_ctl stop -m fast`` if it runs, then remove the folder."""
    bin_dir = find_binaries()
    if bin_dir is not None and (directory / "data" / "postmaster.pid").exists():
        subprocess.run(
            [bin_dir / "pg_ctl", "-D", directory / "data", "-m", "fast", "-w", "stop"],
            **_user_options(_run_as()),
            cwd=directory,
            capture_output=True,
            check=False,
            timeout=60,
        )
    shutil.rmtree(directory, ignore_errors=True)


def _run_as() -> pwd.struct_passwd | None:
    """The ``postgres`` system user when we are root (postgres will not run as root), else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError as err:
        raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server as") from err


def _user_options(user: pwd.struct_passwd | None) -> dict:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "env": {**os.environ, "HOME": user.pw_dir}}


def _run(user: pwd.struct_passwd | None, directory: Path, *argv: object) -> None:
    """Run one PostgreSQL tool in ``directory`` (which that user can enter); its output goes in the error."""
    try:
        result = subprocess.run(
            [str(a) for a in argv], **_user_options(user), cwd=directory, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PostgresUnavailable(f"{Path(str(argv[0])).name} did not run: {err}") from err
    if result.returncode != 0:
        log = directory / "server.log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise PostgresUnavailable(
            f"{Path(str(argv[0])).name} failed with code {result.returncode}: {result.stderr.strip()[-2000:]}\n{tail}"
        )
