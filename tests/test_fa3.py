"""Loading Flash Attention 3: the hub probe (real HTTP servers on loopback) and the fallback when loading fails."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from autoresearch import fa3  # noqa: E402
from autoresearch.confine import confined, landlock_abi  # noqa: E402


class Answer(http.server.BaseHTTPRequestHandler):
    """Answers every request (also a proxy's absolute-URI request) with 200 and records the request line."""
    seen = []

    def do_HEAD(self):
        Answer.seen.append(self.requestline)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Answer.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_probe_uses_the_port_of_hf_endpoint(server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert fa3.hub_reachable(timeout=5)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    assert not fa3.hub_reachable(timeout=2)
    assert time.monotonic() - start < 3


def test_hub_probe_goes_through_the_configured_proxy(server, monkeypatch):
    # the hub's name does not resolve here: only a proxy can answer for it
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.invalid:8443")
    for key in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server}")
    assert fa3.hub_reachable(timeout=5)
    assert any("hub.example.invalid:8443" in line for line in Answer.seen), Answer.seen


@pytest.mark.skipif(landlock_abi()[0] < 4, reason="confined TCP needs Landlock ABI 4 (kernel 6.7)")
def test_a_confined_run_reaches_the_hub_on_the_ports_the_loop_names_for_it_and_on_no_other(server, tmp_path):
    probe = [sys.executable, "-c", "from autoresearch import fa3; print(fa3.hub_reachable(timeout=5))"]
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_ENDPOINT"}
    # straight to the hub, then through a proxy (the hub's own name does not resolve here)
    for extra in ({"HF_ENDPOINT": f"http://127.0.0.1:{server}", "NO_PROXY": "127.0.0.1"},
                  {"HF_ENDPOINT": "http://hub.example.invalid:8443", "HTTPS_PROXY": f"http://127.0.0.1:{server}",
                   "HTTP_PROXY": f"http://127.0.0.1:{server}"}):
        env = {**base, **extra}
        assert server in fa3.download_ports(env), fa3.download_ports(env)
        for ports, reached in ((fa3.download_ports(env), "True"), ((), "False")):
            p = subprocess.run(confined(probe, [tmp_path], ports=ports), cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=60)
            assert p.stdout.strip() == reached and "TCP" in p.stderr, (extra, ports, p.stdout, p.stderr)
    assert fa3.download_ports({}) == [443] and fa3.download_ports({"https_proxy": "proxy:3128"}) == [443, 3128]


def test_a_loading_error_without_a_message_falls_back_instead_of_crashing(monkeypatch, capsys):
    import kernels

    def fail(*args, **kwargs):
        raise RuntimeError()  # str() is "": the first line of its message does not exist
    monkeypatch.setattr(kernels, "get_kernel", fail)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fa3.load_flash_attention_3() is None
    assert "Flash Attention 3 unavailable (RuntimeError); falling back" in capsys.readouterr().out
    assert fa3.first_line(ValueError("bad dtype\nmore")) == "ValueError: bad dtype"
