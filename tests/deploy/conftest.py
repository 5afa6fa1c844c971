"""A real PostgreSQL for the deploy tests: initdb + pg_ctl into a temporary directory, on a free
port (another one if it is taken before the server binds it), started with the server arguments
docker-compose.yml gives the postgres service.

PostgreSQL refuses to run as root; under root (CI containers) the server runs as the `postgres`
user that Debian's postgresql package creates. Skips only when no PostgreSQL binaries exist
(install them with `apt-get install -y postgresql`; .ci/run does).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "ehr_admin"
DEBEZIUM_PASSWORD = "dbz-test"


def postgres_bin_dir() -> Path | None:
    candidates = []
    if shutil.which("pg_ctl"):
        candidates.append(Path(shutil.which("pg_ctl")).resolve().parent)
    candidates += [Path(d) for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((d for d in candidates if (d / "initdb").exists() and (d / "pg_ctl").exists()
                 and (d / "psql").exists()), None)


def compose_postgres_args() -> list[str]:
    """The server arguments of the compose postgres service (after the `postgres` program name)."""
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["postgres"]
    command = service["command"]
    assert command[0] == "postgres", "the postgres service must run the postgres server"
    return command[1:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    bin_dir: Path
    port: int

    def dsn(self, dbname: str = "postgres", user: str = ADMIN, password: str | None = None) -> str:
        auth = f" password={password}" if password else ""
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}{auth}"

    def psql(self, dbname: str, script: Path, variables: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a script as the image's entrypoint does: psql -v ON_ERROR_STOP=1 -f."""
        args = [str(self.bin_dir / "psql"), "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port),
                "-U", ADMIN, "-d", dbname, "-f", str(script)]
        for name, value in (variables or {}).items():
            args += ["-v", f"{name}={value}"]
        return subprocess.run(args, capture_output=True, text=True, timeout=60)

    def new_database(self) -> str:
        import psycopg

        name = f"ehr_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name


class PortTaken(RuntimeError):
    """The port was free when picked and taken before PostgreSQL bound it."""


def start_postgres(run_as: list[str], bin_dir: Path, data: Path, workdir: Path, *, pick_port=_free_port,
                   tries: int = 3) -> int:
    """pg_ctl start on a free port; returns the port. PostgreSQL cannot bind port 0 and report the
    port it got, so a port another process took between the pick and the bind (another test's
    broker, on a busy machine) is replaced by another pick, `tries` times."""
    log = workdir / "server.log"
    for attempt in range(tries):
        port = pick_port()
        logged = log.stat().st_size if log.exists() else 0
        options = " ".join([*compose_postgres_args(), "-c", f"port={port}", "-c", "listen_addresses=127.0.0.1",
                            "-c", f"unix_socket_directories={workdir}", "-c", "fsync=off"])
        started = subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log),
                                  "-w", "-t", "60", "start"], capture_output=True, text=True, timeout=90)
        if started.returncode == 0:
            return port
        said = log.read_bytes()[logged:].decode(errors="replace") if log.exists() else ""
        if "Address already in use" not in said:
            raise RuntimeError(f"pg_ctl start failed ({started.returncode}): {started.stderr.strip()}\n{said[-2000:]}")
        if attempt == tries - 1:
            raise PortTaken(f"port {port} was taken before PostgreSQL bound it, {tries} times in a row")
    raise AssertionError("unreachable")


@contextmanager
def running_postgres(bin_dir: Path, *, pick_port=_free_port):
    """A PostgreSQL server in a temporary directory, stopped and removed on exit."""
    as_root = os.geteuid() == 0
    # not pytest's tmp_path: its parents are private to the current user, the server may be another
    workdir = Path(tempfile.mkdtemp(prefix="wardwatch-pg-"))
    data = workdir / "data"
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        owner = pwd.getpwnam("postgres")
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
    try:
        subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", ADMIN, "--auth=trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        yield PostgresServer(bin_dir, start_postgres(run_as, bin_dir, data, workdir, pick_port=pick_port))
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


def postgres_or_skip() -> Path:
    """The PostgreSQL binaries, or skip the test when it cannot run a server here."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl, psql): apt-get install -y postgresql")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
    return bin_dir


@pytest.fixture(scope="session")
def postgres_server():
    with running_postgres(postgres_or_skip()) as server:
        yield server


@pytest.fixture
def ehr_database(postgres_server):
    """A fresh database set up as the postgres image's init scripts set it up: ehr-schema.sql via
    psql, then the real deploy/postgres/debezium.sh with the image's environment."""
    name = postgres_server.new_database()
    schema = postgres_server.psql(name, ROOT / "deploy" / "postgres" / "ehr-schema.sql")
    assert schema.returncode == 0, f"ehr-schema.sql failed: {schema.stderr}"
    env = {"PATH": f"{postgres_server.bin_dir}:{os.environ['PATH']}", "PGHOST": "127.0.0.1",
           "PGPORT": str(postgres_server.port), "POSTGRES_USER": ADMIN, "POSTGRES_DB": name,
           "DEBEZIUM_DB_PASSWORD": DEBEZIUM_PASSWORD,
           "DEBEZIUM_SQL": str(ROOT / "deploy" / "postgres" / "debezium.sql")}
    hook = subprocess.run(["bash", str(ROOT / "deploy" / "postgres" / "debezium.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert hook.returncode == 0, f"debezium.sh failed: {hook.stderr}"
    return name
