"""Test settings: one thread, no model hub, no network; tiny real-architecture models built once per session."""

import os

# Before torch is imported anywhere: with 2 threads on 2 cores a step is 10-40x slower once anything else runs.
for key, value in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}.items():
    os.environ[key] = value

import ipaddress
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ARCHES = ("sd1", "sd2", "sdxl")


class NetworkBlocked(RuntimeError):
    pass


def _is_local(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return isinstance(address, (str, bytes))  # unix socket paths


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _guarded(original):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
            raise NetworkBlocked(f"tests may not reach the network (tried {address!r})")
        return original(self, address)

    return connect


def pytest_configure(config):
    socket.socket.connect = _guarded(_connect)
    socket.socket.connect_ex = _guarded(_connect_ex)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed browser test shows the end of the app's own log (a handler's traceback lands there)."""
    outcome = yield
    report = outcome.get_result()
    tmp = item.funcargs.get("tmp_path") if hasattr(item, "funcargs") else None
    if report.failed and tmp is not None:
        for log in sorted(Path(tmp).glob("app-*.log")):
            report.sections.append((f"{log.name} (last 80 lines)",
                                    "\n".join(log.read_text(errors="replace").splitlines()[-80:])))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (test.sh runs two workers), the browser tests run one after another on one worker:
    they wait on live training, and two at once on two cores would starve each other. The longest tests go
    first, so no worker is left with one long test at the end."""
    for item in items:
        if item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.xdist_group("browser"))
    items.sort(key=lambda item: not item.get_closest_marker("slow"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """arch -> (diffusers folder, single-file .safetensors) of a tiny random model, built once per session."""
    from tests.tiny_models import save_both

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_both(arch, root) for arch in ARCHES}
