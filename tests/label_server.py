"""Run `rlhfkit label serve` as a real process on 127.0.0.1 for the labelling app's end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tasks(path: Path, prompts: list[str], k: int = 3) -> Path:
    """A {prompt, responses} file: prompt i gets k distinct responses."""
    path.write_text("".join(json.dumps({"prompt": p, "responses": [f"answer {j} to: {p}" for j in range(k)]}) + "\n"
                            for p in prompts))
    return path


class LabelServer:
    """`python -m rlhfkit.cli label serve ...` in a subprocess; output goes to a log file."""

    def __init__(self, tmp: Path, *args: str, admin_token: str = "admin-token-for-tests"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = admin_token
        self.log = tmp / f"server-{self.port}.log"
        # The admin token in the environment, as the README advises (flags show in `ps`).
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1",
               "RLHFKIT_ADMIN_TOKEN": admin_token}
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rlhfkit.cli", "label", "serve", "--port", str(self.port), *args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not start within {timeout} s:\n{self.log.read_text()}")

    def stats(self) -> dict:
        return httpx.get(self.url + "/api/stats", headers={"authorization": f"Bearer {self.admin_token}"},
                         timeout=10).json()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or a power cut of the process."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
