"""``tuneforge serve`` as a user runs it: a subprocess on 127.0.0.1 with an API key (from the environment),
reachable by the ``openai`` client, 401 without the key, stopped by SIGINT; bad arguments exit 2 with one
line naming the argument, before anything is served (in process, through ``tuneforge.cli.main``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subprocess_with_key_from_environment() -> None:
    port = _free_port()
    env = {**os.environ, "TUNEFORGE_API_KEY": "env-key"}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", "tiny-llama", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.3)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="env-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-llama"]
        r = client.completions.create(model="tiny-llama", prompt="the cat", max_tokens=3)
        assert r.usage.completion_tokens <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert "serving tiny-llama on http://127.0.0.1" in out and "API key required" in out


@pytest.mark.parametrize(("args", "message"), [
    (["nowhere-model"], "'nowhere-model' is neither a known model"),
    (["tiny-llama", "--adapter", "x"], "--adapter takes NAME=RUN"),
    (["tiny-llama", "--adapter", "x=/no/such/run"], "does not exist"),
    (["tiny-llama", "--max-loaded", "0"], "max_loaded"),
    ([], "give a model or run to serve"),
])
def test_bad_arguments_exit_2_naming_them(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from tuneforge import cli

    monkeypatch.setattr(sys, "argv", ["tuneforge", "serve", *args, "--port", "1"])
    with pytest.raises(SystemExit) as exc:  # in process (fast): these fail before anything is served
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert message in err and "Traceback" not in err
