"""The Ansible role `dropgate` (deploy/ansible/roles/dropgate), applied for real with the real ansible-playbook.

- In a scratch root: every path of the role pointed under tmp_path (the groups
  are `root`, so the machine's /etc/group is left alone; systemd is not running
  here, so the service steps are skipped by the role's own guard). Applied twice,
  then in check mode: the second and third runs change nothing; a folder whose
  mode someone changed is put back, and only it.
- With the production paths and real groups, in a throwaway mount namespace
  (/etc, /opt, /usr, /var, /run overlaid on a tmpfs), as tests/integration/
  test_deploy.py does for install.sh: the same folders, owners and modes.

dropgate comes from a wheelhouse built from this source tree (pip wheel), so
the role's offline install is what runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, cannot_run, require_tool
from tests.deploy_files import OVERLAY_SYSTEM, assert_installed_layout
from tests.fleet import ANSIBLE, ansible_playbook
from tests.servers import sbin_tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SITE_PLAYBOOK = ANSIBLE / "site.yml"


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dropgate's wheel and its dependencies' (pip wheel, from a copy of the source tree)."""
    work = tmp_path_factory.mktemp("wheelhouse")
    source = work / "source"
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "pipeline", "states"):
        if (ROOT / part).is_dir():
            shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / part, source / part)
    wheels = work / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--wheel-dir",
         str(wheels), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        cannot_run(f"cannot build the wheels (pip wheel): {result.stderr.strip()[-500:]}")
    return wheels


def the_wheel(wheels: Path) -> Path:
    found = sorted(wheels.glob("dropgate-*.whl"))
    assert len(found) == 1, found
    return found[0]


def recap(output: str, host: str) -> dict[str, int]:
    match = re.search(rf"^{re.escape(host)}\s+:\s+(.*)$", output, re.M)
    assert match, output[-3000:]
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def changed_tasks(output: str) -> list[str]:
    """The tasks that reported a change, by name (for a useful failure message)."""
    tasks, current = [], ""
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            current = line.split("[", 1)[1].rsplit("]", 1)[0]
        elif line.startswith("changed:"):
            tasks.append(current)
    return tasks


def apply_role(
    work: Path, variables: dict[str, Any], *, check: bool = False, succeed: bool = True
) -> tuple[dict[str, int], str]:
    """ansible-playbook site.yml on this machine (local connection), as an operator would run it."""
    for sub in ("home", "tmp"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    inventory = work / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"dropgate": {"hosts": {"scratch": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "ansible_remote_tmp": str(work / "tmp")}}}}}}))
    extra = work / "vars.json"
    extra.write_text(json.dumps(variables))
    argv = [ansible_playbook(), "-i", str(inventory), str(SITE_PLAYBOOK), "-e", f"@{extra}"]
    if check:
        argv.append("--check")
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_HOME": str(work / "home"),
           "ANSIBLE_LOCAL_TEMP": str(work / "tmp"), "ANSIBLE_NOCOLOR": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, cwd=work)
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == succeed, output[-6000:]
    return recap(output, "scratch"), output


def vendor_key(folder: Path) -> Path:
    from pipeline.signing import generate_keypair

    folder.mkdir(parents=True, exist_ok=True)
    return generate_keypair(folder / "vendor-2026")[1]


def mode_of(path: Path) -> str:
    return f"{path.stat().st_mode & 0o7777:o}"


def test_the_role_installs_a_site_in_a_scratch_root_and_a_second_run_changes_nothing(
    tmp_path: Path, wheelhouse: Path
) -> None:
    if os.geteuid() != 0:
        cannot_run("the role sets owners (root) and modes: it needs root")
    sshd = sbin_tool("sshd")
    # Given a scratch root, and variables pointing every path of the role into it
    root = tmp_path / "root"
    for folder in ("usr/bin", "etc/ssh/sshd_config.d", "etc/tmpfiles.d", "etc/systemd/system", "var/lib", "run"):
        (root / folder).mkdir(parents=True)
    host_key = tmp_path / "ssh_host_ed25519_key"  # for sshd -t on the drop-in
    subprocess.run([sbin_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd -t wants its privilege separation folder
    public = vendor_key(tmp_path / "vendor")
    variables = {
        "dropgate_wheel": str(the_wheel(wheelhouse)),
        "dropgate_wheelhouse": str(wheelhouse),
        "dropgate_python": sys.executable,
        "dropgate_prefix": f"{root}/opt/dropgate",
        "dropgate_bin_link": f"{root}/usr/bin/dropgate",
        "dropgate_admin_group": "root",
        "dropgate_upload_group": "root",
        "dropgate_chroot": f"{root}/var/lib/dropgate",
        "dropgate_backups": f"{root}/var/backups/dropgate",
        "dropgate_run_dir": f"{root}/run/dropgate",
        "dropgate_config_dir": f"{root}/etc/dropgate",
        "dropgate_tmpfiles_file": f"{root}/etc/tmpfiles.d/dropgate.conf",
        "dropgate_unit_file": f"{root}/etc/systemd/system/dropgate.service",
        "dropgate_unit_drop_in": f"{root}/etc/systemd/system/dropgate.service.d/site.conf",
        "dropgate_sshd": sshd,
        "dropgate_sshd_drop_in": f"{root}/etc/ssh/sshd_config.d/dropgate-inbox.conf",
        "dropgate_sshd_host_key": str(host_key),
        "dropgate_trust_keys": [{"name": "vendor-2026.pub", "src": str(public)}],
        "dropgate_config": {
            "platform": {"product": "gts", "root": f"{root}/opt/gts", "data": [f"{root}/var/lib/gts"]},
            "policy": {"require_approval": True},
            "metrics": {"listen": "127.0.0.1:9199"},
        },
    }
    work = tmp_path / "ansible"

    # When the role is applied
    first, output = apply_role(work, variables)
    # Then it installed dropgate and configured the site
    assert first["failed"] == 0 and first["changed"] > 10, output[-3000:]
    link = root / "usr/bin/dropgate"
    assert os.readlink(link) == f"{root}/opt/dropgate/venv/bin/dropgate"
    config = root / "etc/dropgate/dropgate.yaml"
    check = subprocess.run([str(link), "--config", str(config), "run", "--check"],
                           capture_output=True, text=True, timeout=60)
    assert (check.returncode, check.stdout.strip()) == (0, f"configuration OK: {config}"), check.stderr
    written = yaml.safe_load(config.read_text())
    assert written["paths"] == {"inbox": f"{root}/var/lib/dropgate/inbox", "state": f"{root}/var/lib/dropgate/state",
                                "backups": f"{root}/var/backups/dropgate"}
    assert written["trust"]["keys"] == [f"{root}/etc/dropgate/keys/vendor-2026.pub"]
    assert written["policy"] == {"require_approval": True}
    assert written["maintenance"]["flag_file"] == f"{root}/run/dropgate/maintenance"
    assert (root / "etc/dropgate/keys/vendor-2026.pub").read_bytes() == public.read_bytes()
    # the folders have the owners and modes of deploy/systemd/dropgate-tmpfiles.conf, and so do the boot entries
    modes = {"var/lib/dropgate": "755", "var/lib/dropgate/inbox": "3770", "var/lib/dropgate/state": "2750",
             "var/backups/dropgate": "700", "run/dropgate": "755", "etc/dropgate": "750",
             "etc/dropgate/keys": "750"}
    assert {folder: mode_of(root / folder) for folder in modes} == modes
    assert mode_of(config) == "640"
    entries = [line.split() for line in (root / "etc/tmpfiles.d/dropgate.conf").read_text().splitlines()
               if line.startswith("d ")]
    shipped = [line.split()[:5] for line in (ROOT / "deploy/systemd/dropgate-tmpfiles.conf").read_text().splitlines()
               if line.startswith("d ")]
    assert [[kind, path.removeprefix(str(root)), mode.lstrip("0") or "0", user] for kind, path, mode, user, *_ in
            entries] == [[kind, path, mode.lstrip("0"), user] for kind, path, mode, user, _group in shipped]
    # the unit as shipped, and a drop-in naming this site's command, configuration and writable folders
    assert (root / "etc/systemd/system/dropgate.service").read_text() == \
        (ROOT / "deploy/systemd/dropgate.service").read_text()
    drop_in = (root / "etc/systemd/system/dropgate.service.d/site.conf").read_text()
    assert f"ExecStart={link} run\n" in drop_in
    assert f"Environment=DROPGATE_CONFIG={config}\n" in drop_in
    assert f"{root}/opt/gts {root}/var/lib/gts" in drop_in
    # the SFTP drop-in as shipped, with this site's chroot, checked by sshd
    sftp = (root / "etc/ssh/sshd_config.d/dropgate-inbox.conf").read_text()
    shipped_sftp = (ROOT / "deploy/sshd/dropgate-inbox.conf").read_text()
    assert sftp == shipped_sftp.replace("Match Group dropgate-upload\n", "Match Group root\n").replace(
        "ChrootDirectory /var/lib/dropgate\n", f"ChrootDirectory {root}/var/lib/dropgate\n")
    # and the service steps were skipped: systemd does not run here
    assert "dropgate : The service] ***" in output and not re.search(r"The service\] \*+\nchanged", output)

    # When it is applied again, and in check mode after that
    second, output = apply_role(work, variables)
    third, check_output = apply_role(work, variables, check=True)
    # Then nothing changed
    assert second["changed"] == 0, changed_tasks(output)
    assert third["changed"] == 0, changed_tasks(check_output)

    # When someone opened the state folder to everyone, and the configuration variables change
    (root / "var/lib/dropgate/state").chmod(0o777)
    variables["dropgate_config"]["policy"] = {"require_approval": False}
    _, output = apply_role(work, variables)
    # Then the next run puts the folder back and rewrites the configuration (validated), and nothing else
    assert changed_tasks(output) == ["dropgate : Folders, with their owners and modes", "dropgate : The configuration"]
    assert mode_of(root / "var/lib/dropgate/state") == "2750"
    assert yaml.safe_load(config.read_text())["policy"] == {"require_approval": False}

    # When the configuration would be invalid, Then dropgate refuses it and the file in place stays
    variables["dropgate_config"]["policy"] = {"on_failure": "explode"}
    refused, output = apply_role(work, variables, succeed=False)
    assert refused["failed"] == 1
    assert "policy.on_failure" in output
    assert yaml.safe_load(config.read_text())["policy"] == {"require_approval": False}


IN_NAMESPACE = r"""
set -eu
out=$1 scratch=$2 playbook=$3 inventory=$4 extra=$5
""" + OVERLAY_SYSTEM + r"""
mkdir -p /run/sshd
for name in first second; do
    ansible-playbook -i "$inventory" "$playbook" -e "@$extra" > "$out/$name.txt" 2>&1 ||
        { echo "exit status $?" >> "$out/$name.txt"; exit 1; }
done
getent group dropgate-admin dropgate-upload | cut -d: -f1 > "$out/groups.txt"
stat -c '%n %a %U %G' /var/lib/dropgate /var/lib/dropgate/inbox /var/lib/dropgate/state /var/backups/dropgate \
    /run/dropgate /etc/dropgate /etc/dropgate/dropgate.yaml > "$out/modes.txt"
readlink /usr/bin/dropgate > "$out/link.txt"
/usr/bin/dropgate run --check > "$out/check.txt" 2>&1
if command -v systemd-analyze > /dev/null; then
    systemd-analyze verify /etc/systemd/system/dropgate.service > "$out/verify.txt" 2>&1 ||
        echo "exit status $?" >> "$out/verify.txt"
fi
"""


def test_the_role_with_the_production_paths_makes_what_install_sh_makes_and_then_finds_it_in_place(
    tmp_path: Path, wheelhouse: Path
) -> None:
    unshare = require_tool("unshare")
    if os.geteuid() != 0:
        cannot_run("applying the role for real (in a mount namespace) needs root")
    if not Path("/etc/ssh/ssh_host_ed25519_key").exists():
        cannot_run("no /etc/ssh/ssh_host_ed25519_key to check the sshd drop-in with (install openssh-server)")
    # Given a mount namespace where /etc, /opt, /usr, /var and /run are overlays on a tmpfs,
    # and the role with its defaults: only the wheel, the vendor key and the platform are given
    public = vendor_key(tmp_path / "vendor")
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps({
        "dropgate_wheel": str(the_wheel(wheelhouse)),
        "dropgate_wheelhouse": str(wheelhouse),
        "dropgate_python": sys.executable,
        "dropgate_trust_keys": [{"name": "vendor-2026.pub", "src": str(public)}],
        "dropgate_config": {"platform": {"product": "gts", "root": "/opt/gts", "data": ["/var/lib/gts"]}},
    }))
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"dropgate": {"hosts": {"scratch": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "ansible_remote_tmp": str(tmp_path / "ansible-tmp")}}}}}}))
    script = tmp_path / "in-namespace.sh"
    script.write_text(IN_NAMESPACE)
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    scratch.mkdir()
    env = {**os.environ, "PATH": f"{Path(ansible_playbook()).parent}:{os.environ['PATH']}",
           "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1"}
    # When the role is applied there twice
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "bash", str(script), str(out), str(scratch),
         str(SITE_PLAYBOOK), str(inventory), str(extra)],
        capture_output=True, text=True, timeout=1200, env=env,
    )
    if result.returncode == 97 or "unshare failed" in result.stderr:
        cannot_run(f"this machine does not allow mount namespaces with overlays: {result.stderr.strip()}")
    runs = {name: (out / f"{name}.txt").read_text() for name in ("first", "second")
            if (out / f"{name}.txt").exists()}
    assert result.returncode == 0, result.stderr + "\n".join(text[-3000:] for text in runs.values())
    # Then the first run made the groups, and the folders with the owners and modes install.sh gives them
    assert recap(runs["first"], "scratch")["changed"] > 10
    assert_installed_layout(out)
    # its configuration, at the default path, is valid
    assert (out / "check.txt").read_text().strip() == "configuration OK: /etc/dropgate/dropgate.yaml"
    if (out / "verify.txt").exists():  # the shipped unit with the role's drop-in
        assert "exit status" not in (out / "verify.txt").read_text()
    # and the second run found everything in place
    assert recap(runs["second"], "scratch")["changed"] == 0, changed_tasks(runs["second"])

