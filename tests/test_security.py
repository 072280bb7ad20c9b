"""Issue #14, "nobody let in, nothing lost": each finding tried against the app on 127.0.0.1, and the checks of
ui/security.py on their own."""

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

import app as app_cli
from tests.test_app_cli import ROOT, free_port
from trainer import config
from ui import security

PNG = ROOT / "demo" / "dataset"


class Served:
    """app.py in a subprocess on a free port of 127.0.0.1; `request` sends raw HTTP with any headers."""

    def __init__(self, tmp: Path, *args: str, env: dict | None = None):
        self.port, self.runs = free_port(), tmp / "home" / "runs"
        self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), "--runs-dir", str(self.runs),
                                      *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=os.environ | (env or {}))
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                self.request("GET", "/")
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.stdout.read()
                time.sleep(0.5)
        raise RuntimeError("the app did not start")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read().decode(errors="replace"), dict(r.getheaders())
        finally:
            conn.close()

    def call(self, name: str, *data) -> tuple[str, object]:
        """A raw call of /gradio_api/call/<name>: ("complete", outputs) or ("error", message)."""
        status, text, _ = self.request("POST", f"/gradio_api/call/{name}", json.dumps({"data": list(data)}).encode(),
                                       {"Content-Type": "application/json"})
        assert status == 200, (status, text)
        status, text, _ = self.request("GET", f"/gradio_api/call/{name}/{json.loads(text)['event_id']}")
        event = next(line[7:] for line in text.splitlines() if line.startswith("event: "))
        payload = json.loads(next(line[6:] for line in text.splitlines() if line.startswith("data: ")))
        return event, payload.get("error") if isinstance(payload, dict) else payload

    def stop(self) -> str:
        self.proc.terminate()
        return self.proc.communicate(timeout=30)[0]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("security"))
    yield served
    served.stop()


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# --- the API is the product's API ---

def test_only_the_documented_routes_answer_a_call_by_name(app):
    _, text, _ = app.request("GET", "/config")
    names = {d["api_name"] for d in json.loads(text)["dependencies"]} - set(security.API_ROUTES)
    assert "on_save" in names and len(names) > 10
    for name in sorted(names):
        for route in ("call", "call/v2", "run", "api"):
            status, text, _ = app.request("POST", f"/gradio_api/{route}/{name}", b'{"data": ["/tmp", "x.png", "hi"]}',
                                          {"Content-Type": "application/json"})
            assert status == 404 and "not part of the API" in text, (route, name, status, text)
    _, text, _ = app.request("GET", "/gradio_api/info")
    assert sorted(json.loads(text)["named_endpoints"]) == sorted(f"/{n}" for n in security.API_ROUTES)
    assert app.call("list_runs") == ("complete", [{"runs": []}])


def test_close_api_leaves_only_ours_public(tmp_path):
    from ui.app import build_app

    demo = build_app(tmp_path / "runs", tmp_path / "models")  # build_app closes it
    on_save = next(fn for fn in demo.fns.values() if fn.api_name == "on_save")
    assert on_save.api_visibility == "private"
    on_save.api_visibility = "public"
    assert security.close_api(demo) == ["on_save"]
    public = sorted(fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public")
    assert public == sorted(security.API_ROUTES)
    assert {d["api_name"] for d in demo.config["dependencies"] if d["api_visibility"] == "public"} == set(public)
    assert security.close_api(demo) == []  # twice is harmless


# --- names ---

@pytest.mark.parametrize("bad", ["", " ", "..", ".", "../x", "a/b", "/any/dir", "a\\b", ".datasets", "a\x00b",
                                 "x" * 300, None, 3])
def test_plain_name_refuses_paths(bad):
    with pytest.raises(ValueError, match="run id"):
        security.plain_name(bad, "run id")


def test_inside_refuses_a_link_out_of_its_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "out").symlink_to(tmp_path)
    assert security.inside(tmp_path / "runs", "20250101-120000-character", "run id") == (
        tmp_path / "runs" / "20250101-120000-character")
    with pytest.raises(ValueError, match="leads outside"):
        security.inside(tmp_path / "runs", "out", "run id")


def test_job_manager_refuses_a_run_id_that_is_a_path(tmp_path):
    from ui.jobs import JobManager

    jobs = JobManager(tmp_path / "runs", devices=[])
    for bad in ("/any/dir", "../x", ".datasets"):
        with pytest.raises(ValueError, match="run id") as e:
            jobs.run_dir(bad)
        assert repr(bad) in str(e.value)


@pytest.mark.parametrize("route", ["status", "cancel", "resume", "files"])
def test_run_routes_refuse_a_path_and_write_nothing_there(app, tmp_path, route):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.toml").write_text('preset = "character"\n')
    (victim / "status.json").write_text('{"state": "cancelled", "message": ""}')
    app.runs.parent.joinpath("x").mkdir(exist_ok=True)
    (app.runs.parent / "x" / "config.toml").write_text('preset = "character"\n')
    before, outside = tree(victim), tree(app.runs.parent / "x")
    for bad in (str(victim), "../x"):
        event, message = app.call(route, bad)
        assert event == "error" and "plain name" in message, (bad, message)
    event, message = app.call(route, "no-such-run")
    assert event == "error" and "no run 'no-such-run'" in message
    assert tree(victim) == before and tree(app.runs.parent / "x") == outside


def test_create_run_refuses_presets_and_settings_that_lead_elsewhere(app, tmp_path):
    from gradio_client import Client, handle_file

    toml = tmp_path / "uploaded.toml"
    toml.write_text("network_dim = 4\n")
    client = Client(f"http://127.0.0.1:{app.port}", verbose=False)
    pictures = [handle_file(str(p)) for p in sorted(PNG.iterdir())[:2]]
    home = app.runs.parent
    attempts = [({"preset": os.path.relpath(toml.with_suffix(""), config.PRESETS_DIR)}, "unknown preset"),
                ({"settings": {"preset": "../../../escaped"}}, "preset cannot be set here"),
                ({"settings": {"data": {"train_data_dir": "/etc"}}}, "train_data_dir cannot be set here"),
                ({"settings": {"pretrained_model_name_or_path": "/x"}}, "pretrained_model_name_or_path cannot")]
    for change, message in attempts:
        args = {"images": pictures, "preset": "character", "base": "demo", "settings": {"max_train_epochs": 1}}
        with pytest.raises(Exception, match=message):
            client.predict(**(args | change), api_name="/create_run")
    assert {p.name for p in home.iterdir()} <= {"runs", "x"}  # x: made by the test above
    assert not [p for p in app.runs.iterdir() if not p.name.startswith(".")]
    assert not list(tmp_path.parent.glob("*escaped*")) and not list(home.parent.glob("*escaped*"))


# --- hosts and origins ---

def test_a_foreign_host_header_is_refused(app):
    for host in ("evil.example", f"evil.example:{app.port}", "127.0.0.1.evil.example"):
        status, text, _ = app.request("GET", "/", headers={"Host": host})
        assert status == 403 and "not this app's address" in text, host
    for host in (f"localhost:{app.port}", f"127.0.0.1:{app.port}", f"[::1]:{app.port}"):
        assert app.request("GET", "/", headers={"Host": host})[0] == 200, host


def test_a_cross_origin_post_is_refused(app):
    body, headers = json.dumps({"data": []}).encode(), {"Content-Type": "application/json"}
    for origin in (f"http://localhost:{app.port + 1}", "http://localhost", "null", "https://evil.example"):
        status, text, _ = app.request("POST", "/gradio_api/call/list_runs", body, headers | {"Origin": origin})
        assert status == 403 and "requests from other pages are refused" in text, origin
    own = {"Origin": f"http://127.0.0.1:{app.port}", "Host": f"127.0.0.1:{app.port}"}
    assert app.request("POST", "/gradio_api/call/list_runs", body, headers | own)[0] == 200


@pytest.mark.parametrize("header, allowed", [("127.0.0.1:7860", True), ("LOCALHOST", True), ("[::1]:1", True),
                                             ("studio.lan:7860", True), ("evil.example", False), ("", False),
                                             (None, False), ("localhost.evil.example", False)])
def test_host_refusal(header, allowed):
    hosts = security.allowed_hosts("127.0.0.1", ["studio.lan"])
    assert (security.host_refusal(header, hosts) is None) == allowed


def test_listening_everywhere_allows_this_machines_names_and_still_no_other(monkeypatch):
    monkeypatch.setattr(security, "machine_names", lambda: {"Studio", "192.0.2.7"})  # no network in tests
    hosts = security.allowed_hosts("0.0.0.0")
    assert {"studio", "192.0.2.7"} <= hosts and security.host_refusal("evil.example", hosts)
    assert security.host_of("studio.lan") in security.allowed_hosts("studio.lan")


def test_origin_refusal():
    assert security.origin_refusal(None, "127.0.0.1:7860") is None
    assert security.origin_refusal("http://127.0.0.1:7860", "127.0.0.1:7860") is None
    assert security.origin_refusal("http://localhost:7861", "localhost:7860")
    assert security.origin_refusal("http://127.0.0.1:7860", None)


# --- logins ---

def test_login_throttle_doubles_the_lock_out():
    t = security.LoginThrottle(free=3, window_s=60, base_s=1, max_s=8)
    for i in range(3):
        assert t.wait_s("a", now=i) == 0
        t.record("a", ok=False, now=i)
    assert t.wait_s("a", now=2.5) == 0.5 and t.wait_s("b", now=2.5) == 0
    t.record("a", ok=False, now=3)
    assert t.wait_s("a", now=3) == 2
    for i in range(10):
        t.record("a", ok=False, now=4)
    assert t.wait_s("a", now=4) == 8  # capped
    assert t.wait_s("a", now=200) == 0  # the window forgets
    t.record("a", ok=True)
    assert "a" not in t.failures


def login(served: Served, user: str, password: str) -> tuple[int, dict]:
    body = urllib.parse.urlencode({"username": user, "password": password}).encode()
    status, _, headers = served.request("POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
    return status, headers


def test_failed_logins_lock_the_client_out_and_env_auth_stays_out_of_ps(tmp_path):
    served = Served(tmp_path, "--login-failures", "3", env={app_cli.AUTH_ENV: "ana:env-secret"})
    try:
        cmdline = Path(f"/proc/{served.proc.pid}/cmdline").read_bytes().decode()
        ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(served.proc.pid)], capture_output=True, text=True)
        assert "env-secret" not in cmdline and "env-secret" not in ps.stdout
        assert login(served, "ana", "env-secret")[0] == 200
        start, codes = time.monotonic(), [login(served, "ana", f"wrong-{i}")[0] for i in range(30)]
        took = time.monotonic() - start
        assert codes[:3] == [400] * 3 and codes[3:] == [429] * 27, codes  # 27 of 30 never reach the password check
        status, headers = login(served, "ana", "env-secret")
        assert status == 429 and int(headers["retry-after"]) >= 1  # locked out, even with the right password
        time.sleep(int(headers["retry-after"]) + 0.2)
        assert login(served, "ana", "env-secret")[0] == 200
        print(f"30 wrong passwords in {took:.2f} s: {codes.count(400)} checked, {codes.count(429)} refused")
    finally:
        served.stop()


def test_auth_file_option_and_the_warning_for_a_password_on_the_command_line(tmp_path):
    app = app_cli
    users = tmp_path / "users"
    users.write_text("ana:file-secret\n")
    args = app.parse_args(["--auth-file", str(users)])
    assert app.read_auth(args, environ={}) == [("ana", "file-secret")]
    assert app.read_auth(app.parse_args([]), environ={app.AUTH_ENV: "bo:b\ncy:c"}) == [("bo", "b"), ("cy", "c")]
    assert app.read_auth(app.parse_args([]), environ={}) is None
    r = subprocess.run([sys.executable, "-c", "import app; print(app.read_auth(app.parse_args(['--auth', 'ana:pw'])))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=os.environ | {app.AUTH_ENV: ""})
    assert "[('ana', 'pw')]" in r.stdout and "visible" not in r.stdout and "`ps`" in r.stderr
    r = subprocess.run([sys.executable, "app.py", "--auth-file", str(tmp_path / "none")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no such file" in r.stderr


def test_uploads_over_the_limit_are_refused(tmp_path):
    assert app_cli.parse_args([]).max_upload == "4gb"
    served = Served(tmp_path, "--max-upload", "1kb")
    try:
        boundary = "----lora"
        part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.zip\"\r\n"
                "Content-Type: application/zip\r\n\r\n").encode() + b"x" * 4096 + f"\r\n--{boundary}--\r\n".encode()
        status, text, _ = served.request("POST", "/gradio_api/upload", part,
                                         {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status == 413, (status, text)
    finally:
        served.stop()
