"""app.py: serves on 127.0.0.1, and refuses to listen beyond it or share without a password."""

import os
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
        env = {k: v for k, v in os.environ.items() if k != "LORA_STUDIO_AUTH"}  # a password from there would do
        r = subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env=env)
        assert r.returncode != 0
        assert "without --auth" in r.stderr


def test_auth_from_a_file_lets_its_users_in_and_no_one_else(tmp_path):
    import http.cookiejar
    import urllib.error
    import urllib.parse

    users = tmp_path / "users.txt"
    users.write_text("ana:first-secret\nbo:pass:with:colons\n\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(tmp_path / "runs"),
                             "--host", "0.0.0.0", "--auth", str(users)],  # beyond localhost: allowed with --auth
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def login(user: str, password: str):
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        data = urllib.parse.urlencode({"username": user, "password": password}).encode()
        try:
            status = opener.open(f"{url}/login", data=data, timeout=10).status
        except urllib.error.HTTPError as e:
            status = e.code
        return status, opener

    def config_status(opener) -> int:
        try:
            return opener.open(f"{url}/config", timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        assert config_status(urllib.request.build_opener()) == 401  # no login, no app
        for user, password in (("ana", "first-secret"), ("bo", "pass:with:colons")):
            status, opener = login(user, password)
            assert status == 200 and config_status(opener) == 200, user
        status, opener = login("ana", "wrong")
        assert status >= 400 and config_status(opener) == 401
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_a_malformed_auth_file_is_refused(tmp_path):
    bad = tmp_path / "users.txt"
    bad.write_text("ana:secret\njust-a-name\n")
    r = subprocess.run([sys.executable, "app.py", "--auth", str(bad)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "expected USER:PASSWORD" in r.stderr
