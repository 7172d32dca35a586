"""Processes started and stopped by PID, with their logs and PID files under one state directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    """Where PID files, logs and server data live: $IEX_STATE_DIR or <repo>/.iex (git-ignored)."""
    path = Path(os.environ.get("IEX_STATE_DIR") or repo_root() / ".iex")
    path.mkdir(parents=True, exist_ok=True)
    return path


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URLs built by the stack
            return 200 <= response.status < 300
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


@dataclass
class ManagedProcess:
    """One long-running process of the stack, known by name."""

    name: str
    argv: Sequence[str]
    ready: Callable[[], bool]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    ready_timeout_s: float = 60.0
    # SIGTERM for everything; tritonserver handles it as a clean shutdown (SIGINT is not for it).
    stop_signal: int = signal.SIGTERM
    stop_timeout_s: float = 20.0
    describe: str = ""

    @property
    def pid_file(self) -> Path:
        return state_dir() / "pids" / f"{self.name}.pid"

    @property
    def ready_file(self) -> Path:
        """Written when the process became ready: its PID and how long the start took (`status` reads it)."""
        return state_dir() / "pids" / f"{self.name}.ready"

    def record_ready(self, pid: int, took_s: float) -> None:
        self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        self.ready_file.write_text(json.dumps({"pid": pid, "ready_s": round(took_s, 2), "ready_at": round(time.time(), 3)}))

    def ready_record(self, pid: int | None) -> dict | None:
        """What record_ready wrote for `pid`, None for another PID (a process started since) or none."""
        try:
            record = json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            return None
        return record if pid is not None and record.get("pid") == pid else None

    @property
    def log_file(self) -> Path:
        return state_dir() / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self) -> int:
        existing = self.pid()
        if existing is not None:
            return existing
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(  # noqa: S603 - argv built by the stack, never from user input
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=env,
                start_new_session=True,  # its own process group: stopping it stops its children
            )
        self.pid_file.write_text(str(proc.pid))
        return proc.pid

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.ready():
                return
            if not self.running():
                raise RuntimeError(f"{self.name} exited during start-up; see {self.log_file}:\n{self.tail_log()}")
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready after {self.ready_timeout_s:.0f}s; see {self.log_file}:\n{self.tail_log()}")

    def stop(self) -> bool:
        """Stops the process group by PID; True when something was stopped."""
        pid = self.pid()
        self.ready_file.unlink(missing_ok=True)
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        _signal_group(pid, self.stop_signal)
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        if pid_alive(pid):
            _signal_group(pid, signal.SIGKILL)
            for _ in range(50):
                if not pid_alive(pid):
                    break
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """SIGKILL without grace: what the chaos tests do."""
        pid = self.pid()
        if pid is not None:
            _signal_group(pid, signal.SIGKILL)
            for _ in range(50):
                if not pid_alive(pid):
                    break
                time.sleep(0.1)

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, sig)
