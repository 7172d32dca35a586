"""One local HTTP server for both downloaders: nginx from Debian on loopback (aiohttp if nginx is absent).

nginx is what the anchor used and what a real image host looks like: sendfile, keep-alive, one worker
so the server takes as little of the shared CPU as possible.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NGINX_CONF = """
{user}
worker_processes 1;
daemon off;
pid {state}/nginx.pid;
error_log {state}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {state}/client_body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    types {{ image/jpeg jpg; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""

_AIOHTTP_SERVER = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/", sys.argv[1])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
"""


def _wait_port(port: int, process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"image server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"image server not listening on {port}")


class ImageServer:
    def __init__(self, root: Path, port: int, state: Path) -> None:
        self.root = root
        self.port = port
        self.state = state
        self.process: subprocess.Popen | None = None
        self.kind = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ImageServer":
        self.state.mkdir(parents=True, exist_ok=True)
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if nginx:
            conf = self.state / "nginx.conf"
            # As root, nginx workers default to `nobody`, who cannot read a cache under root's home.
            user = "user root;" if os.geteuid() == 0 else ""
            conf.write_text(NGINX_CONF.format(user=user, state=self.state, port=self.port, root=self.root))
            argv = [nginx, "-c", str(conf), "-p", str(self.state), "-e", str(self.state / "error.log")]
            self.kind = "nginx"
        else:
            argv = [sys.executable, "-c", _AIOHTTP_SERVER, str(self.root), str(self.port)]
            self.kind = "aiohttp"
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        _wait_port(self.port, self.process)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT if self.kind == "nginx" else signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
