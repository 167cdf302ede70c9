"""Start, watch and stop one `python -m sglang.launch_server` (its own process group, log to a file)."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from loadtest.metrics import QUEUED, RUNNING, TOKEN_USAGE, parse_prometheus

# The baseline runs SGLang without the plugin: SGLANG_PLUGINS is a whitelist of general plugins and this name
# matches none (our entry point is "ams").
NO_PLUGINS = {"SGLANG_PLUGINS": "no-plugins"}


def server_command(python: str, model: str, port: int, flags: list[str], host: str = "127.0.0.1") -> list[str]:
    return [python, "-m", "sglang.launch_server", "--model-path", model, "--host", host, "--port", str(port),
            "--enable-metrics", *flags]


class Server:
    def __init__(self, cmd: list[str], log: Path, env: dict | None = None, port: int = 30000,
                 host: str = "127.0.0.1"):
        self.cmd, self.log, self.port = cmd, Path(log), port
        self.url = f"http://{host}:{port}"
        self.host = host
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "AMS_KV_CONFIG"}   # the plugin sets it itself
        env.update(self.env)
        with self.log.open("w") as log:
            # start_new_session: the server and its scheduler/detokenizer children form one process group
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, timeout: float, progress=None) -> bool:
        """Until /health answers 200 (False if the process exits or the time runs out)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.alive():
                return False
            if self.get("/health", timeout=5) is not None:
                return True
            if progress:
                progress(time.monotonic() - t0)
            time.sleep(1)
        return False

    def get(self, path: str, timeout: float = 10) -> str | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.read().decode(errors="replace") if resp.status == 200 else None
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def post(self, path: str, body: dict, timeout: float = 300) -> dict | None:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def metrics(self) -> dict[str, float]:
        return parse_prometheus(self.get("/metrics") or "")

    def stop(self, grace: float = 30) -> None:
        """SIGTERM to the whole process group, SIGKILL after `grace` seconds; then wait for the port to close."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                self.proc.wait(wait)
                # children may outlive the parent for a moment: give the group the same grace
                if not _group_alive(self.proc.pid, wait):
                    break
            except subprocess.TimeoutExpired:
                continue
        t0 = time.monotonic()
        while _port_open(self.host, self.port) and time.monotonic() - t0 < 30:
            time.sleep(0.5)


def _group_alive(pgid: int, wait: float) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


class Poller(threading.Thread):
    """Polls /metrics every `every` seconds during a run: running/queued requests and KV usage to a CSV."""

    def __init__(self, server: Server, out: Path, every: float = 1.0):
        super().__init__(daemon=True)
        self.server, self.out, self.every = server, Path(out), every
        self.stopped = threading.Event()
        self.last: dict = {}

    def run(self) -> None:
        with self.out.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["t", "running", "queued", "token_usage"])
            while not self.stopped.is_set():
                values = self.server.metrics()
                if values:
                    self.last = {"running": values.get(RUNNING), "queued": values.get(QUEUED),
                                 "token_usage": values.get(TOKEN_USAGE)}
                    writer.writerow([round(time.time(), 3), *self.last.values()])
                    f.flush()
                self.stopped.wait(self.every)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=30)
