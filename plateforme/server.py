"""Run a real tritonserver on a model repository.

Finds `tritonserver` on PATH (NVIDIA's containers) or the complete Triton build bundled in the
`nvidia-pytriton` wheel. The bundled python backend needs a stub built for the running Python
next to `libtriton_python.so`, and the stub finds its Python by searching PATH, so the server is
started with this interpreter's directory first on PATH.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from plateforme.paths import home


class ServerError(RuntimeError):
    """tritonserver could not be found, started, or did not become ready."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    # None: the server's own default (/opt/tritonserver/backends in NVIDIA's containers).
    backend_directory: Path | None
    # Shared libraries the relocated python-backend stub needs (its RPATH is relative).
    library_path: Path | None = None


def find_tritonserver() -> TritonInstall:
    """$PLATEFORME_TRITONSERVER, then `tritonserver` on PATH, then the nvidia-pytriton bundle."""
    explicit = os.environ.get("PLATEFORME_TRITONSERVER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise ServerError(f"PLATEFORME_TRITONSERVER={explicit} is not an executable file")
        return TritonInstall(Path(explicit), None)
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None)
    try:
        import pytriton
    except ImportError as exc:
        raise ServerError(
            "no tritonserver found: not on PATH and the nvidia-pytriton wheel is not installed "
            "(pip install nvidia-pytriton==0.7.0)"
        ) from exc
    bundle = Path(pytriton.__file__).parent / "tritonserver"
    binary = bundle / "bin" / "tritonserver"
    if not binary.exists():
        raise ServerError(f"nvidia-pytriton is installed but {binary} is missing")
    libs = bundle.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary, prepare_python_backend(bundle), libs if libs.is_dir() else None)


def prepare_python_backend(bundle: Path) -> Path:
    """A backend directory whose python backend has the stub for the running Python.

    The wheel ships one stub per Python version; the backend looks for it next to
    `libtriton_python.so`, so we build a small directory of links plus the right stub.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundle / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"nvidia-pytriton has no python-backend stub for Python {version}")
    source = bundle / "backends" / "python"
    target_root = home() / "triton" / f"backends-py{version}"
    target = target_root / "python"
    if not (target / "triton_python_backend_stub").exists():
        tmp = target_root.with_name(target_root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "python").mkdir(parents=True)
        for entry in source.iterdir():
            if entry.name != "__pycache__":
                (tmp / "python" / entry.name).symlink_to(entry)
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        shutil.rmtree(target_root, ignore_errors=True)
        os.rename(tmp, target_root)
    return target_root


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ServerConfig:
    model_repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Path | None = None
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)


class TritonServer:
    """A tritonserver child process: start, wait until ready, stop without leftovers.

    Leftovers a crashed python model can leave are stub processes and /dev/shm segments. The
    server runs in its own process group (stubs inherit it) and with a shared-memory prefix of
    its own, so both can be cleaned up after it exits.
    """

    def __init__(self, config: ServerConfig, install: TritonInstall | None = None):
        self.config = config
        self.install = install or find_tritonserver()
        self.process: subprocess.Popen | None = None
        self.shm_prefix = f"plateforme-{os.getpid()}-{config.grpc_port}-"
        self.log_path = Path(
            config.log_file or home() / "logs" / f"tritonserver-{config.http_port}.log"
        )
        self._log_handle = None

    # -- addresses ---------------------------------------------------------------------
    @functools.cached_property
    def bind_address(self) -> str:
        """The numeric IPv4 address tritonserver binds: it takes neither names (it bound "localhost"
        as 255.255.255.255) nor IPv6 addresses. Resolved once: every URL property reads it."""
        host = self.config.host or "0.0.0.0"
        try:
            return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        except socket.gaierror:
            raise ServerError(f"--host {host} is not an IPv4 address or name: tritonserver listens on IPv4 "
                              "(127.0.0.1, or 0.0.0.0 for every interface)") from None

    @property
    def _probe_host(self) -> str:
        address = self.bind_address
        return "127.0.0.1" if address == "0.0.0.0" else address

    @property
    def http_url(self) -> str:
        return f"{self._probe_host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._probe_host}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._probe_host}:{self.config.metrics_port}/metrics"

    # -- lifecycle ---------------------------------------------------------------------
    def command(self) -> list[str]:
        cfg = self.config
        cmd = [
            str(self.install.binary),
            f"--model-repository={Path(cfg.model_repository).absolute()}",
            f"--http-address={self.bind_address}",
            f"--http-port={cfg.http_port}",
            f"--grpc-address={self.bind_address}",
            f"--grpc-port={cfg.grpc_port}",
            f"--metrics-address={self.bind_address}",
            f"--metrics-port={cfg.metrics_port}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            # Rendered configs are complete; skipping auto-complete makes start-up ~3x faster.
            "--disable-auto-complete-config",
            "--exit-timeout-secs=10",
            f"--log-verbose={cfg.log_verbose}",
        ]
        if self.install.backend_directory is not None:
            cmd.append(f"--backend-directory={self.install.backend_directory}")
        return cmd + list(cfg.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The python-backend stub embeds Python and finds its prefix from `python3` on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # With pyenv-style builds, make the stub load this interpreter's libpython, not the
        # system's copy of the same version.
        libdirs = [sysconfig.get_config_var("LIBDIR"), self.install.library_path]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            str(p) for p in (*libdirs, env.get("LD_LIBRARY_PATH")) if p
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def check(self) -> None:
        """What start() would fail on before launching anything: the host, ports and the repository."""
        address = self.bind_address
        ports = {"--http-port": self.config.http_port, "--grpc-port": self.config.grpc_port,
                 "--metrics-port": self.config.metrics_port}
        check_distinct_ports(ports)
        repo = Path(self.config.model_repository)
        if not repo.is_dir():
            raise ServerError(f"model repository {repo} does not exist or is not a directory")
        if not any(repo.glob("*/config.pbtxt")):
            raise ServerError(f"model repository {repo} holds no models (no MODEL/config.pbtxt in it); "
                              "render one with `plateforme repo`")
        for flag, port in ports.items():
            check_port_free(address, port, flag)

    def start(self, timeout: float = 300.0) -> "TritonServer":
        self.check()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            start_new_session=True,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode} during start-up"
                    f"{''.join(f'; {failure}' for failure in self.load_failures())}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            time.sleep(0.2)
        raise ServerError(
            f"tritonserver was not ready after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self) -> int:
        return self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, wait for Triton's graceful shutdown, then clean what it left."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self.process.wait()
        _kill_group(pgid)
        for segment in glob.glob(f"/dev/shm/{self.shm_prefix}*"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment)
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None

    def load_failures(self) -> list[str]:
        """"model 'x' failed to load: <first line of the reason>" for each model the log says failed
        (or whose config.pbtxt did not parse): the reason is logged above the tail that start-up
        errors quote."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        failures, parse_error = [], ""
        for line in text.splitlines():
            # protobuf logs where a config.pbtxt is wrong just before Triton names the directory.
            if match := re.search(r"Error parsing text-format inference\.ModelConfig: (.*)$", line):
                parse_error = f" (at line:column {match[1].strip()})"
            elif match := re.search(r"Poll failed for model directory '([^']+)': (.*?)\"?$", line):
                failures.append(f"model directory {match[1]!r}: {match[2].strip()}{parse_error}")
                parse_error = ""
            # Triton logs the reason with its newlines escaped: keep what comes before the first one.
            elif match := re.search(r"failed to load '([^']+)' version \d+: (.*?)(?:\\n|\"?$)", line):
                failures.append(f"model {match[1]!r} failed to load: {match[2].strip()}")
        return failures

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        # CUDA probing errors are expected on CPU-only machines; keep the lines that matter.
        relevant = [line for line in text if "CUDA" not in line and "cuda" not in line]
        return "\n".join(relevant[-lines:])

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def check_distinct_ports(ports: dict[str, int]) -> None:
    """Each service its own port: `ports` maps option names to their values."""
    first_flag: dict[int, str] = {}
    for flag, port in ports.items():
        if port in first_flag:
            raise ServerError(f"{first_flag[port]} and {flag} are both {port}; give each its own port")
        first_flag[port] = flag


def check_port_free(host: str, port: int, flag: str) -> None:
    """Fail before start-up, naming the option to change, rather than after a server half started."""
    if not 1 <= port <= 65535:
        raise ServerError(f"{flag} {port} is not a port number (1-65535)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ServerError(f"--host {host} is not an address of this machine ({exc.strerror})") from exc
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ServerError(f"--host {host} is not an address of this machine") from exc
            raise ServerError(f"{flag} {port} on {host} is not available ({exc.strerror}); "
                              "choose another port") from exc


def _live_group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are still running (zombies excluded)."""
    members = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(stat) as handle:
                # The command name may contain spaces; fields after it are fixed.
                fields = handle.read().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(stat.split("/")[2]))
    return members


def _kill_group(pgid: int, grace: float = 5.0) -> None:
    """Stop any process left in the server's group (python-backend stubs)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace
        while _live_group_members(pgid):
            if time.monotonic() > deadline:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            time.sleep(0.1)
        else:
            return
