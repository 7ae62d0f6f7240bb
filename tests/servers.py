"""Real servers on loopback that several tests run: sshd, Prometheus, nginx with the shipped snippet, a platform;
and a throwaway TLS certificate.

Each is the real program with a throwaway configuration under the test's
folder; what the configuration says stays with the test that writes it, the
starting, waiting and stopping is here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, require_tool, wait_for

NGINX = ROOT / "deploy" / "nginx"


def sbin_tool(name: str) -> str:
    """A system tool, also found in /usr/sbin (sshd, nginx), which is not on every user's PATH."""
    sbin = Path("/usr/sbin") / name
    if shutil.which(name) is None and os.access(sbin, os.X_OK):
        return str(sbin)
    return require_tool(name)


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: a server the test started does not outlive it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, log: Path) -> None:
    """Wait until `proc` accepts connections on 127.0.0.1:`port`; fail with its log if it exits first."""

    def listening() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, timeout=30, what=f"{what} to listen")


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (its own CA, for a client's trust store) and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


# -- sshd -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshKeys:
    host_key: Path
    user_key: Path
    known_hosts: Path  # the client's: this server's host key at 127.0.0.1:port
    authorized_keys: Path  # the server's: the user key


def make_ssh_keys(folder: Path, port: int) -> SshKeys:
    """A fresh host key and user key in `folder`, each trusted by the other side for a server on `port`."""
    keygen = sbin_tool("ssh-keygen")
    keys = SshKeys(
        folder / "ssh_host_ed25519_key", folder / "id_ed25519", folder / "known_hosts", folder / "authorized_keys"
    )
    for key in (keys.host_key, keys.user_key):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    keys.authorized_keys.write_text(keys.user_key.with_suffix(".pub").read_text())
    host_public = " ".join(keys.host_key.with_suffix(".pub").read_text().split()[:2])
    keys.known_hosts.write_text(f"[127.0.0.1]:{port} {host_public}\n")
    return keys


def throwaway_sshd_config(port: int, keys: SshKeys) -> str:
    """The head of a test sshd's configuration: root by key only, keys under /tmp (StrictModes would refuse
    them), no PAM, SFTP served in-process. What the test adds goes after it (a Match block last)."""
    return "\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {keys.host_key}",
        "PidFile none",
        f"AuthorizedKeysFile {keys.authorized_keys}",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "UsePAM no",
        "Subsystem sftp internal-sftp",
        "",
    ])


def start_sshd(config: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """A private sshd with `config` (checked with `sshd -t` first), listening on `port` when this returns."""
    sshd = sbin_tool("sshd")
    # The privilege separation folder; the ssh service creates it at boot, a host where it never ran lacks it.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    checked = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    wait_listening(proc, port, "sshd", log_path)
    return proc


# -- Prometheus -----------------------------------------------------------------------------------


class PrometheusServer:
    """A real Prometheus on loopback, on the prometheus.yml its caller wrote in `folder`, with its own data."""

    def __init__(self, binary: str, folder: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = folder / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log, stderr=subprocess.STDOUT, cwd=folder,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def get(self, path: str, **params: str) -> Any:
        """An API answer's `data` (the body for other paths); None while the server does not answer."""
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read()
        except OSError:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            return None
        return json.loads(body)["data"] if path.startswith("/api/") else body

    def stop(self) -> None:
        stop_process(self.proc, grace=30)


# -- nginx in front of the platform ---------------------------------------------------------------


class PlatformBackend:
    """The platform behind nginx: answers every GET with `body`."""

    def __init__(self, body: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def maintenance_nginx(folder: Path, flag: Path, ports: Mapping[int, int], backend_port: int) -> Iterator[str]:
    """A real nginx on loopback with the shipped maintenance snippet in front of the platform at `backend_port`.

    The test copy of the snippet changes only what is site-specific: the flag,
    the page's folder, and the shipped loopback ports named in `ports` (shipped
    port: this test's). Yields nginx's URL.
    """
    binary = sbin_tool("nginx")
    (folder / "page").mkdir(parents=True)
    shutil.copy(NGINX / "maintenance.html", folder / "page" / "maintenance.html")
    snippet = (NGINX / "dropgate-maintenance.conf").read_text()
    for shipped, here in (
        ("/run/dropgate/maintenance", str(flag)),
        ("root /opt/dropgate/share/nginx;", f"root {folder / 'page'};"),
        *((f"127.0.0.1:{shipped_port}", f"127.0.0.1:{port}") for shipped_port, port in ports.items()),
    ):
        assert shipped in snippet, shipped
        snippet = snippet.replace(shipped, here)
    (folder / "dropgate-maintenance.conf").write_text(snippet)
    port = free_port()
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in kinds)
    (folder / "nginx.conf").write_text(
        # master_process off: one process, no workers, no user switch; for a test server only
        f"daemon off;\nmaster_process off;\npid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'} warn;\n"
        "events { worker_connections 64; }\n"
        "http {\n    access_log off;\n" + temp + "\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n"
        f"        include {folder / 'dropgate-maintenance.conf'};\n"
        f"        location / {{ proxy_pass http://127.0.0.1:{backend_port}; }}\n    }}\n}}\n"
    )
    command = [binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(proc, port, "nginx", folder / "error.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
