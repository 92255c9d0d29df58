"""The `plateforme` command as a user runs it (subprocesses, real server)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from plateforme.server import free_port


def plateforme(*args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "plateforme", *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def test_help_lists_the_subcommands():
    result = plateforme("--help")
    assert result.returncode == 0
    for command in ("assets", "repo", "serve", "demo", "chat", "embed"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), command
    serve_help = plateforme("serve", "--help").stdout
    demo_help = plateforme("demo", "--help").stdout
    for flag in ("--host", "--http-port", "--grpc-port", "--metrics-port"):
        assert flag in serve_help and flag in demo_help
    assert "--once" in demo_help
    assert re.fullmatch(r"plateforme \d+\.\d+\.\d+\n", plateforme("--version").stdout)


@pytest.mark.parametrize("args,message", [
    (["serve", "--model-repository", "/nonexistent/repo"], "does not exist"),
    (["serve", "--model-repository", str(Path(__file__).parent)], "holds no models"),
    (["repo", "--endpoint", "mistral-tiny"], "NAME=DIR"),
    (["repo", "--endpoint", "mistral-tiny=/nonexistent"], "no config.json"),
    (["assets", "no-such-asset"], "unknown asset"),
    (["serve", "--model-repository", "/tmp", "--http-port", "99999"], "--http-port: 99999 is not a port number"),
    (["demo", "--gateway-port", "http"], "--gateway-port: 'http' is not a port number"),
    (["gateway", "--port", "0"], "--port: 0 is not a port number"),
    (["gateway", "--timeout", "0"], "--timeout: 0 is not a positive number of seconds"),
    (["serve", "--model-repository", "/tmp", "--host", "::1"], "--host ::1 is not an IPv4 address or name"),
    (["serve", "--model-repository", str(Path(__file__).parent), "--http-port", "9000", "--grpc-port", "9000"],
     "--http-port and --grpc-port are both 9000; give each its own port"),
    (["demo", "--gateway-port", "8002"], "--metrics-port and --gateway-port are both 8002"),
    (["fill-template", __file__, "no-colon"], "plateforme fill-template: error: substitution 'no-colon' is not key:value"),
])
def test_user_mistakes_are_one_clear_line(args, message):
    result = plateforme(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "Starting" not in result.stdout


@pytest.mark.parametrize("command,flag", [(["gateway"], "--port"), (["demo"], "--gateway-port")])
def test_a_taken_port_is_named_before_anything_starts(command, flag):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = plateforme(*command, flag, str(port))
    assert result.returncode == 2, result.stderr
    assert f"{flag} {port} on 127.0.0.1 is not available" in result.stderr
    assert "Traceback" not in result.stderr and "Starting" not in result.stdout


def test_an_unparsable_config_pbtxt_is_named_with_its_line(tmp_path):
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size 8\n')
    result = plateforme("serve", "--model-repository", str(tmp_path), "--http-port", str(free_port()),
                        "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), timeout=120)
    assert result.returncode == 2, result.stderr
    first_line = result.stderr.splitlines()[0]
    assert f"model directory 'broken': failed to read text proto from {tmp_path}/broken/config.pbtxt" in first_line
    assert "at line:column 3:" in first_line


def test_tritonserver_binds_the_numeric_address_of_a_host_name():
    from plateforme.server import ServerConfig, TritonServer

    # tritonserver took "localhost" for 255.255.255.255 and never became ready on HTTP.
    command = TritonServer(ServerConfig("/tmp", host="localhost")).command()
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(command)


def test_repo_renders_given_endpoints(tmp_path, tiny_mistral_dir):
    result = plateforme("repo", "--out", str(tmp_path / "repo"), "--endpoint", f"mistral-tiny={tiny_mistral_dir}",
                        "--separate-prefill", "false")
    assert result.returncode == 0, result.stderr
    config = (tmp_path / "repo" / "mistral-tiny-engine" / "config.pbtxt").read_text()
    assert 'key: "separate_prefill" value: { string_value: "false" }' in config


def test_chat_and_embed_against_a_running_server(server):
    chat = plateforme("chat", "What is the capital of France?", "--model", "smollm2", "--url", server.grpc_url,
                      "--temperature", "0", "--max-tokens", "32", "-v")
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout
    assert "finish:" in chat.stderr
    over_http = plateforme("chat", "What is the capital of France?", "--model", "smollm2",
                           "--url", f"http://{server.http_url}/", "--http", "--temperature", "0", "--max-tokens", "32")
    assert over_http.stdout == chat.stdout
    embed = plateforme("embed", "hello world", "bonjour le monde", "--url", server.grpc_url, "--json")
    assert embed.returncode == 0, embed.stderr
    vectors = json.loads(embed.stdout)
    assert [len(v["embedding"]) for v in vectors] == [384, 384]


def test_chat_error_from_the_server_is_reported(server):
    result = plateforme("chat", "hi", "--model", "smollm2", "--url", server.grpc_url, "--max-tokens", "0")
    assert result.returncode == 2
    assert "max_tokens" in result.stderr and "Traceback" not in result.stderr
    over_http = plateforme("chat", "hi", "--model", "smollm2", "--url", server.http_url, "--http", "--max-tokens", "0")
    assert over_http.returncode == 2 and "data:" not in over_http.stderr
    assert over_http.stderr.startswith("plateforme chat: error: max_tokens must be")
    # An endpoint of the other kind is named as such, before any call.
    wrong = plateforme("chat", "hi", "--model", "mistral-embed", "--url", server.grpc_url)
    assert wrong.returncode == 2
    assert "mistral-embed serves embedding requests, not chat requests: use plateforme embed" in wrong.stderr
    wrong = plateforme("embed", "hi", "--model", "mistral-tiny", "--url", server.grpc_url)
    assert wrong.returncode == 2 and "mistral-tiny serves chat requests, not embedding requests" in wrong.stderr
    # La Plateforme's later names are aliases of the served endpoints.
    alias = plateforme("chat", "hi", "--model", "open-mistral-7b", "--url", server.grpc_url, "--max-tokens", "3")
    assert alias.returncode == 0, alias.stderr


def _segments(grpc_port: int) -> set[str]:
    """The shared-memory segments of the server on `grpc_port` (named plateforme-PID-GRPC_PORT-...)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("plateforme-")
            and name.split("-")[2:3] == [str(grpc_port)]}


def _stub_processes(repo: Path) -> set[int]:
    """The python-backend stubs of the models in `repo` (other servers may run beside the test)."""
    pids = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
            if b"triton_python_backend_stub" in text and str(repo).encode() in text:
                pids.add(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


def test_a_terminated_conversion_leaves_nothing_behind(tmp_path, smollm2_dir):
    """SIGTERM (a cancelled CI job, `timeout`) unwinds as Ctrl-C does: the partial directory goes."""
    out = tmp_path / "ckpt"
    process = subprocess.Popen([sys.executable, "-m", "plateforme", "convert", str(smollm2_dir), str(out),
                                "--dtype", "float32", "--quiet"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".ckpt.partial-*")):  # converting, with all the weights left to write
            assert process.poll() is None and time.monotonic() < deadline, "the conversion ended before it was stopped"
            time.sleep(0.01)
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, (process.returncode, stderr)
    assert "plateforme convert: interrupted" in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_on_signal(tmp_path, tiny_mistral_dir, sig):
    repo = tmp_path / "repo"
    assert plateforme("repo", "--out", str(repo), "--endpoint", f"mistral-tiny={tiny_mistral_dir}").returncode == 0
    http_port, grpc_port = free_port(), free_port()
    stubs_before, shm_before = _stub_processes(repo), _segments(grpc_port)
    process = subprocess.Popen(
        [sys.executable, "-m", "plateforme", "serve", "--model-repository", str(repo), "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--metrics-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # As a shell starts a background job (`plateforme serve &`): SIGINT ignored on entry.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("plateforme serve did not become ready")
        assert _stub_processes(repo) - stubs_before, "python models should be running as stub processes"
        assert _segments(grpc_port) - shm_before, "the stubs should hold shared-memory segments"
        process.send_signal(sig)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "Shutting down" in output
    assert not (_stub_processes(repo) - stubs_before)
    assert not (_segments(grpc_port) - shm_before)
