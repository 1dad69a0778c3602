"""Build the web dashboard and serve its files to the gateway (docs/dashboard.md).

``python -m deploy.local.dashboard build``  npm ci (when the lock file changed), generate the TypeScript
                                          client from protos/ with buf, type-check, vite build into
                                          dashboard/dist; skipped when no source changed since the last build.
``python -m deploy.local.dashboard serve``  a small static file server for dashboard/dist on 127.0.0.1; Envoy
                                          routes every GET that is not a gRPC path to it (gateway/dashboard.yaml).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboard"
DIST = DASHBOARD / "dist"
_STAMP = DASHBOARD / ".build-stamp"
_LOCK_STAMP = DASHBOARD / "node_modules" / ".maw-lock-hash"
# Everything the build reads; dashboard/src/gen is generated from protos/ and so is covered by them.
_INPUTS = ("package.json", "package-lock.json", "tsconfig.json", "vite.config.ts", "index.html")
_TREES = ((DASHBOARD / "src", ("gen",)), (DASHBOARD / "proto", ()), (ROOT / "protos", ()))
# The page talks only to its own origin; nothing inline, nothing from elsewhere.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_NOT_BUILT = (
    b"<!doctype html><title>maw</title><p>The dashboard is not built. Run <code>make dashboard</code> "
    b"(or <code>make up</code>, which builds it), then reload.</p>"
)


def _digest() -> str:
    h = hashlib.sha256()
    files = [DASHBOARD / name for name in _INPUTS] + [ROOT / "buf.gen.ts.yaml"]
    for tree, skip in _TREES:
        files += [p for p in sorted(tree.rglob("*")) if p.is_file() and p.relative_to(tree).parts[0] not in skip]
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0")
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()


def _run(argv: list[str], cwd: Path) -> None:
    sys.stderr.write("+ " + " ".join(argv) + "\n")
    subprocess.run(argv, cwd=cwd, check=True)


def build(force: bool = False) -> Path:
    """Build dashboard/dist unless it is up to date; returns it. Safe to call from parallel processes."""
    with (DASHBOARD / ".build-lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        digest = _digest()
        if not force and (DIST / "index.html").exists() and _STAMP.exists() and _STAMP.read_text() == digest:
            return DIST
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm not found: install Node.js 20 or newer (apt-get install nodejs npm)")
        lock_hash = hashlib.sha256((DASHBOARD / "package-lock.json").read_bytes()).hexdigest()
        if not _LOCK_STAMP.exists() or _LOCK_STAMP.read_text() != lock_hash:
            _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], DASHBOARD)
            _LOCK_STAMP.write_text(lock_hash)
        buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf") or "buf"
        _run([buf, "generate", "--template", "buf.gen.ts.yaml"], ROOT)
        _run([str(DASHBOARD / "node_modules" / ".bin" / "tsc"), "--noEmit"], DASHBOARD)
        _run([str(DASHBOARD / "node_modules" / ".bin" / "vite"), "build", "--logLevel", "warn"], DASHBOARD)
        _STAMP.write_text(digest)
        return DIST


class _Handler(SimpleHTTPRequestHandler):
    """Static files only: no directory listings, long caching for hashed assets, never for index.html."""

    def end_headers(self) -> None:
        immutable = self.path.startswith("/assets/")
        self.send_header("Cache-Control", "public, max-age=31536000, immutable" if immutable else "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", _CSP)
        super().end_headers()

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(404)

    def do_GET(self) -> None:
        if not (Path(self.directory) / "index.html").exists():
            self.send_response(503)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(_NOT_BUILT)))
            self.end_headers()
            self.wfile.write(_NOT_BUILT)
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        # Envoy's access log already records every request; keep only errors here.
        if len(args) > 1 and str(args[1]).startswith(("4", "5")):
            super().log_message(format, *args)


def serve(directory: Path, port: int) -> None:
    """Serve ``directory`` on 127.0.0.1:``port`` until killed."""
    handler = partial(_Handler, directory=str(directory))
    with ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        server.daemon_threads = True
        server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.dashboard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build dashboard/dist when its sources changed")
    b.add_argument("--force", action="store_true", help="build even when up to date")
    s = sub.add_parser("serve", help="serve the built files on 127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--dir", type=Path, default=DIST)
    args = parser.parse_args()
    if args.command == "build":
        sys.stdout.write(f"{build(force=args.force)}\n")
    else:
        serve(args.dir, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
