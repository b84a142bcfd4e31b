"""A throwaway PostgreSQL server for tests: initdb + pg_ctl on 127.0.0.1, a free port, trust auth.

Uses Debian's `postgresql` package (binaries in /usr/lib/postgresql/<ver>/bin) or an `initdb`
on PATH. PostgreSQL refuses to run as root, so under root the server commands run as the
system user `postgres` (made by Debian's package) or, failing that, `spartune_pg` (created
here); the data folder is a fresh temp folder owned by that user. Nothing here needs psycopg2.

    server = PgServer.find()            # None: PostgreSQL is not installed
    server.start()                      # raises PgError (with the server log's tail) on failure
    server.create_database("sweeps")
    url = server.url("sweeps")          # postgresql://spartune@127.0.0.1:PORT/sweeps
    server.pause(); server.resume()     # an outage: stopped, then started on the same port
    server.stop()                       # pg_ctl stop -m fast; kills what is left; removes it all
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from procs import alive

ROLE = "spartune"  # the database superuser made by initdb (not an OS user)
OS_USERS = ("postgres", "spartune_pg")  # who runs the server when we are root
START_TRIES = 3  # a free port can be taken between finding it and binding it


class PgError(RuntimeError):
    """The server could not be set up or started; the message says why."""


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<ver>/bin holding initdb, else the folder of `initdb` on
    PATH; None when PostgreSQL is not installed."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")

    def version(p: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", Path(p).parent.parent.name))

    if found:
        return Path(max(found, key=version)).parent
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """This environment without PG* variables (PGHOST, PGSSLMODE, ... would redirect clients)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


class PgServer:
    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = 0
        self.version = ""
        self.os_user: str | None = None  # set when the server runs as another OS user
        self.root: Path | None = None  # temp folder: data/, server.log, the unix socket
        self._started = False

    @classmethod
    def find(cls) -> PgServer | None:
        bin_dir = find_bin_dir()
        return cls(bin_dir) if bin_dir else None

    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    def url(self, database: str) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    # -- running commands -------------------------------------------------------------------

    def _run(self, *args: str, as_server: bool = True, timeout: float = 60,
             check: bool = True) -> subprocess.CompletedProcess:
        """Run a PostgreSQL binary; as the server's OS user when `as_server` (and we are root)."""
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        kw: dict = {}
        if as_server and self.os_user:
            pw = pwd.getpwnam(self.os_user)
            kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        env = _clean_env()
        if as_server and self.root is not None:
            env["HOME"] = str(self.root)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                               cwd=self.root or None, stdin=subprocess.DEVNULL, **kw)
        except (OSError, subprocess.SubprocessError) as e:
            raise PgError(f"{args[0]}: {type(e).__name__}: {e}") from None
        if check and r.returncode != 0:
            out = (r.stderr.strip() or r.stdout.strip()).splitlines()[-5:]
            raise PgError(f"{args[0]} exited with {r.returncode}: {' | '.join(out)}")
        return r

    def _server_user(self) -> str | None:
        """None when we are not root; else an OS user to run the server as (created if need be)."""
        if os.geteuid() != 0:
            return None
        for name in OS_USERS:
            with contextlib.suppress(KeyError):
                pwd.getpwnam(name)
                return name
        name = OS_USERS[-1]
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        try:
            subprocess.run([useradd, "--system", "--no-create-home", "--user-group",
                            "--shell", "/usr/sbin/nologin", name], check=True,
                           capture_output=True, text=True, timeout=30)
            pwd.getpwnam(name)
        except (OSError, subprocess.SubprocessError, KeyError) as e:
            detail = getattr(e, "stderr", "") or e
            raise PgError(f"running as root, and no user {' or '.join(OS_USERS)} to run "
                          f"PostgreSQL as; useradd failed: {str(detail).strip()}") from None
        return name

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """initdb a fresh cluster and start it on 127.0.0.1 at a free port (a few tries)."""
        self.os_user = self._server_user()
        # Under root the server's user must reach the folder: /tmp, not pytest's 0700 tree.
        parent = "/tmp" if self.os_user and os.path.isdir("/tmp") else None
        self.root = Path(tempfile.mkdtemp(prefix="spartune-pg-", dir=parent))
        if self.os_user:
            pw = pwd.getpwnam(self.os_user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", ROLE, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync", timeout=120)
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                "\n# spartune test server\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "max_connections = 100\n"
                "shared_buffers = 32MB\n"
                "fsync = off\n"  # a throwaway cluster: durability costs time, buys nothing
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
            )
        error = ""
        for _ in range(START_TRIES):
            self.port = free_port()
            r = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                          "-o", f"-p {self.port}", "start", timeout=90, check=False)
            if r.returncode == 0:
                self._started = True
                break
            self._kill_leftover()
            error = f"pg_ctl start exited with {r.returncode}; server log:\n{_tail(self.log)}"
            if "already in use" not in _tail(self.log, 5):
                break
        if not self._started:
            raise PgError(error)
        r = self._run("psql", "-X", "-tA", "-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE,
                      "-d", "postgres", "-c", "SHOW server_version", as_server=False)
        self.version = r.stdout.strip()

    def create_database(self, name: str) -> None:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE, name,
                  as_server=False)

    def pause(self) -> None:
        """Stop the server as an outage would (fast: clients are cut off), keeping its data
        folder and port for `resume`."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop",
                  timeout=60)
        self._started = False

    def resume(self) -> None:
        """Start the paused server again on the same port, with the same data."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", f"-p {self.port}", "start", timeout=90)
        self._started = True

    def stop(self, keep_log: Path | None = None) -> None:
        """Stop the server (fast: disconnects clients), kill anything left, remove the folder.
        Safe to call twice, and after a failed start."""
        if self.root is None:
            return
        if self._started or (self.data / "postmaster.pid").exists():
            with contextlib.suppress(PgError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30",
                          "stop", timeout=60, check=False)
            self._kill_leftover()
            self._started = False
        if keep_log is not None and self.log.exists():
            with contextlib.suppress(OSError):
                shutil.copyfile(self.log, keep_log)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _kill_leftover(self) -> None:
        """If a postmaster still runs (pg_ctl stop failed or timed out), kill it: SIGQUIT is
        PostgreSQL's immediate shutdown (backends told to exit), then SIGKILL; backends that
        outlive it exit on their own when they see their postmaster gone."""
        pid_file = self.data / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        if not _is_postgres(pid):
            return  # a stale pid file: the number may belong to someone else by now
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:  # not a group leader after all: the server alone
                    os.kill(pid, sig)
            for _ in range(50):
                if not alive(pid):
                    return
                time.sleep(0.1)


def _is_postgres(pid: int) -> bool:
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return alive(pid)  # no /proc: trust the pid file
