"""``python -m deploy.local up``: run the whole mesh in the foreground until Ctrl-C (what `make up` does)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .stack import ROOT, SERVICES, Endpoints, Stack

STATE_FILE = "up.json"


def _banner(stack: Stack) -> str:
    p = stack.ports
    lines = [
        "",
        "maw is up.",
        f"  dashboard                  http://localhost:{p.gateway}/  (user admin)",
        f"  gateway (gRPC + gRPC-Web)  localhost:{p.gateway}",
        *(f"  {name:<26} localhost:{p.service(name)}" for name in SERVICES),
        f"  PostgreSQL                 {_safe(stack.database_url)}",
        f"  Redis                      {_safe(stack.redis_url)}",
        "  local agent                workers/local (shell and test tools, 2 slots)",
        f"  admin password             {stack.secrets_dir / 'admin-password'}",
        f"  logs                       {stack.log_dir}",
        "",
        f"  try: grpcurl -plaintext localhost:{p.registry} list",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def _write_state(stack: Stack) -> None:
    # Scripts and tests read where everything listens and which processes belong to the mesh.
    state = {
        "ports": dataclasses.asdict(stack.ports),
        "pids": {name: child.pid for name, child in stack.children.items()},
        "database_url": stack.database_url,
        "redis_url": stack.redis_url,
    }
    (stack.data_dir / STATE_FILE).write_text(json.dumps(state, indent=2))


def _safe(url: str) -> str:
    # Operators' URLs may carry passwords; show where, never the secret.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
    return url


def up(data_dir: Path, random_ports: bool) -> int:
    stack = Stack(data_dir=data_dir, ports=Endpoints.random() if random_ports else Endpoints(), echo=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stack.start_all(agent=True)
        _write_state(stack)
        print(_banner(stack), file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            dead = [name for name, child in stack.children.items() if not child.alive()]
            if dead:
                print(f"\n{', '.join(dead)} exited; stopping the mesh.", file=sys.stderr)
                return 1
        return 0
    finally:
        print("\nstopping…", file=sys.stderr, flush=True)
        stack.stop()
        (stack.data_dir / STATE_FILE).unlink(missing_ok=True)
        print("stopped.", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__)
    parser.add_argument("command", choices=["up"], help="up: start the mesh and run until Ctrl-C")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("MAW_DATA_DIR", ROOT / ".maw")),
        help="where PostgreSQL data and logs live (default .maw/)",
    )
    parser.add_argument(
        "--random-ports", action="store_true", help="listen on free ports instead of the defaults (see up.json)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return up(args.data_dir, args.random_ports)


if __name__ == "__main__":
    sys.exit(main())
