"""A fleet of real sites on this machine, for the rollout tests and bench/fleet.py.

Each site is a `Site` of tests/conftest.py (its own config, inbox, journal,
ports) running the sample platform's application on release 1.0.0, with the
checks a site would have in `verify`: the application answers /health with
the new version, and the site's licence file is there. All sites trust one
vendor key, whose archives the rollout carries.

A site is reached by Ansible's local connection with its own variables
(`dropgate_command`, `dropgate_config`), or over ssh: `SshLogin` runs a private
sshd on a loopback port (its own host key; root may log in with a test key and
gets a normal shell, as an administrator's account would) — what production does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.archive import pack, write_build_dir
from pipeline.sample_platform import release_files, service_commands, write_release
from pipeline.signing import generate_keypair
from tests.conftest import ROOT, Site, cannot_run, deep_merge, free_port, require_tool
from tests.servers import make_ssh_keys, start_sshd, stop_process, throwaway_sshd_config

ANSIBLE = ROOT / "deploy" / "ansible"
ROLLOUT = ANSIBLE / "rollout.yml"
DROPGATE = Path(sys.executable).parent / "dropgate"  # the console script of the venv running the tests


def ansible_playbook() -> str:
    """The ansible-playbook of the test extras (beside this Python), else the one on PATH."""
    beside = Path(sys.executable).parent / "ansible-playbook"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return require_tool("ansible-playbook")


class FleetSite:
    """One site: a dropgate daemon in front of the sample application on release 1.0.0."""

    def __init__(self, name: str, folder: Path, vendor_public: Path, config: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.site = Site(folder)
        self.app_port = free_port()
        shutil.copyfile(vendor_public, self.site.keys / "vendor.pub")
        write_release(self.site.platform / "releases" / "1.0.0", "1.0.0")
        # Release 1.1.0 and later need the site's licence file; the site's own check says so.
        self.licence = self.site.data / "licence.key"
        self.licence.write_text("licensed to the site\n")
        current = self.site.platform / "current" / "VERSION"
        site_check = f'test "$(cat {current})" = 1.0.0 || test -f {self.licence}'
        self.services = service_commands(self.site.platform, self.app_port)
        base: dict[str, Any] = {
            "platform": {"services": self.services, "keep_releases": 2},
            "verify": {
                "http": [{"url": f"http://127.0.0.1:{self.app_port}/health", "version": True}],
                "commands": [["sh", "-c", site_check]],
                "interval_seconds": 0.5,
            },
            "policy": {"timeouts": {"backup": "2m", "apply": "2m", "verify": "20s"}},
        }
        self.site.write_config(**deep_merge(base, dict(config or {})))
        subprocess.run(self.services["start"][0], check=True, capture_output=True, timeout=60)

    @property
    def port(self) -> int:
        return self.site.port

    def start(self) -> None:
        self.site.start_daemon()

    def restart(self) -> None:
        for daemon in self.site.daemons:
            daemon.stop()
        self.site.start_daemon()

    def installed(self) -> str | None:
        value = self.site.status()["installed_version"]
        return None if value is None else str(value)

    def runs(self) -> list[dict[str, Any]]:
        return self.site.history()

    def close(self) -> None:
        for daemon in self.site.daemons:  # first, so that no run starts the application again
            if daemon.alive():
                daemon.stop(timeout=60)
        subprocess.run(self.services["stop"][0], capture_output=True, timeout=60)

    def local_vars(self) -> dict[str, Any]:
        return {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "dropgate_command": str(DROPGATE),
            "dropgate_config": str(self.site.config_path),
        }


class SshLogin:
    """A private sshd on loopback where root logs in with a test key and gets a shell, as Ansible needs."""

    def __init__(self, folder: Path) -> None:
        if os.geteuid() != 0:
            cannot_run("the ssh site logs in as root to a private sshd, which needs root")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        require_tool("ssh")
        keys = make_ssh_keys(folder, self.port)
        self.host_key, self.user_key, self.known_hosts = keys.host_key, keys.user_key, keys.known_hosts
        config = folder / "sshd_config"
        config.write_text(
            throwaway_sshd_config(self.port, keys) + "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        )
        self.log_path = folder / "sshd.log"
        self.proc = start_sshd(config, self.port, self.log_path)

    def host_vars(self) -> dict[str, Any]:
        return {
            "ansible_connection": "ssh",
            "ansible_host": "127.0.0.1",
            "ansible_port": self.port,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.user_key),
            # No shared master connection outliving the playbook; this server's key only.
            "ansible_ssh_args": "-o ControlMaster=no -o ControlPath=none",
            "ansible_ssh_common_args": (
                f"-F /dev/null -o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes "
                "-o IdentitiesOnly=yes -o BatchMode=yes"
            ),
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    def stop(self) -> None:
        stop_process(self.proc, grace=20)


@dataclass
class Rollout:
    """What one `ansible-playbook rollout.yml` did: its exit status, its output, its summary."""

    returncode: int
    output: str
    summary: dict[str, Any]
    seconds: float

    def site(self, name: str) -> dict[str, Any]:
        for line in self.summary["sites"]:
            if line["site"] == name:
                return dict(line)
        raise AssertionError(f"{name} is not in the summary: {self.summary}")

    def outcomes(self) -> dict[str, str]:
        return {line["site"]: line["outcome"] for line in self.summary["sites"]}


class Fleet:
    """`count` sites named site-01, site-02, …; the ones in `over_ssh` are reached through `SshLogin`."""

    def __init__(
        self,
        folder: Path,
        count: int,
        *,
        over_ssh: Iterable[int] = (),
        configs: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        self.folder = folder
        (folder / "vendor").mkdir(parents=True, exist_ok=True)
        self.vendor_key, self.vendor_public = generate_keypair(folder / "vendor" / "vendor")
        self.sites: list[FleetSite] = []
        self.ssh: SshLogin | None = None
        self.over_ssh = set(over_ssh)
        self.runs_of_ansible = 0
        try:
            for number in range(1, count + 1):
                name = f"site-{number:02d}"
                config = (configs or {}).get(number)
                self.sites.append(FleetSite(name, folder / name, self.vendor_public, config))
            if self.over_ssh:
                self.ssh = SshLogin(folder / "sshd")
            for site in self.sites:
                site.start()
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> FleetSite:
        return next(site for site in self.sites if site.name == name)

    def archive(self, version: str, files: Mapping[str, str] | None = None, **manifest: Any) -> Path:
        """A signed `gts.<version>.tgz` of the sample application (plus `files`), made with the vendor's key."""
        body = {"product": "gts", "version": version, "channel": "stable", "min_version": "1.0.0", **manifest}
        payload = {**release_files(version), **(files or {})}
        source = write_build_dir(self.folder / "vendor" / "build" / version, body, payload)
        out = self.folder / "releases"
        out.mkdir(exist_ok=True)
        return pack(source, self.vendor_key, out)

    def inventory(self, names: Iterable[str] | None = None) -> Path:
        wanted = set(names) if names is not None else None
        hosts: dict[str, Any] = {}
        for number, site in enumerate(self.sites, start=1):
            if wanted is not None and site.name not in wanted:
                continue
            host = site.local_vars()
            if number in self.over_ssh:
                assert self.ssh is not None
                host.update(self.ssh.host_vars())
            hosts[site.name] = host
        remote_tmp = self.folder / "ansible" / "remote-tmp"
        inventory = {
            "all": {
                "vars": {"ansible_remote_tmp": str(remote_tmp)},
                "children": {"dropgate": {"hosts": hosts}},
            }
        }
        path = self.folder / "inventory.yml"
        path.write_text(yaml.safe_dump(inventory, sort_keys=False))
        return path

    def rollout(
        self,
        archive: Path,
        *,
        waves: list[int | str],
        extra: Mapping[str, Any] | None = None,
        limit: str | None = None,
        check: bool = False,
        timeout: float = 1200.0,
    ) -> Rollout:
        """Run the shipped rollout.yml on this fleet, as an operator would, and read its summary."""
        self.runs_of_ansible += 1
        work = self.folder / "ansible"
        for sub in ("home", "local-tmp", "remote-tmp"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        summary = work / f"summary-{self.runs_of_ansible}.json"
        variables = {"archive": str(archive), "dropgate_waves": waves, "dropgate_poll_seconds": 1,
                     "dropgate_site_timeout": 600, "dropgate_pickup_timeout": 120, **(extra or {})}
        argv = [ansible_playbook(), "-i", str(self.inventory()), str(ROLLOUT), "-e", json.dumps(variables)]
        if limit:
            argv += ["--limit", limit]
        if check:
            argv.append("--check")
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
            "ANSIBLE_HOME": str(work / "home"),
            "ANSIBLE_LOCAL_TEMP": str(work / "local-tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "DROPGATE_ROLLOUT_SUMMARY": str(summary),
        }
        started = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=self.folder)
        seconds = time.monotonic() - started
        output = result.stdout + result.stderr
        (work / f"output-{self.runs_of_ansible}.txt").write_text(output)
        assert summary.exists(), f"the rollout wrote no summary (exit {result.returncode}):\n{output[-6000:]}"
        return Rollout(result.returncode, output, json.loads(summary.read_text()), seconds)

    def close(self) -> None:
        for site in self.sites:
            site.close()
        if self.ssh is not None:
            self.ssh.stop()
