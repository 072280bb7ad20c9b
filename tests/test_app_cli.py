"""app.py: serves on 127.0.0.1, and refuses to listen beyond it or share without a password."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_a_page_on_localhost(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(tmp_path / "runs")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.time() + 90, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    assert r.status == 200
                    body = r.read().decode()
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        assert body is not None and "LoRA Studio" in body
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}" in out


def test_refuses_to_expose_without_auth():
    for args in (["--host", "0.0.0.0"], ["--share"]):
        r = subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert "without --auth" in r.stderr
