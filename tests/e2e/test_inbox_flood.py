"""A flood of uploads while a run is in `apply`: thousands of files, every kind an uploader can make.

Garbage of every size (empty included), signed archives, copies of them under
other names, symbolic links, 8 GiB sparse files, FIFOs: dropped as fast as the
disk takes renames while run 1 waits in apply. Throughout, the daemon answers
`status`, and every file dropped is visible somewhere an operator looks: still
in the inbox, being screened (taken from the inbox, hashed and checked, not
yet a run: it was shown nowhere), queued, or a run with its outcome. At the
end each file is exactly one run, the signed archives ran in order, and the
metrics agree with the journal.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Site, wait_for


def flood_files(site: Site, count: int, valid: list[Path]) -> list[str]:
    """`count` files staged outside the inbox (a link, FIFO, sparse file, copy or garbage each); their names."""
    stage = site.root / "flood"
    stage.mkdir()
    names: list[str] = []
    archives = iter(valid)
    for number in range(count):
        kind = number % 20
        name = f"f{number:05d}"
        if kind == 0 and (archive := next(archives, None)) is not None:
            name = archive.name
            shutil.copyfile(archive, stage / name)
        elif kind == 1:
            name += ".tgz"  # the bytes of a signed archive under a name that is not its own
            shutil.copyfile(valid[number % len(valid)], stage / name)
        elif kind == 2:
            name += ".lnk"
            os.symlink("/etc/passwd", stage / name)
        elif kind == 3:
            name += ".sparse"
            with open(stage / name, "wb") as handle:
                handle.truncate(8 * 2**30)
        elif kind == 4:
            name += ".fifo"
            os.mkfifo(stage / name)
        else:
            name += ".bin"
            (stage / name).write_bytes(os.urandom(number % 5000))
        names.append(name)
    return names


def seen(site: Site) -> set[str]:
    """Every name an operator can see, read stage by stage in the direction files move (so none is missed)."""
    names = set(os.listdir(site.inbox))
    status = site.cli("status", "--json", timeout=60)
    assert status.returncode == 0, status.stderr
    current = json.loads(status.stdout)
    names |= {item["name"] for item in current["screening"]}
    names |= {item["archive"] for item in current["queued"]}
    history = site.cli("history", "--json", "--limit", "100000", timeout=60)
    assert history.returncode == 0, history.stderr
    return names | {run["archive"] for run in json.loads(history.stdout)}


@pytest.mark.parametrize(
    ("count", "restart", "minor"),
    [(2000, False, 0), (600, True, 0), (600, False, 1)],  # minor 1: run 1 is a 1.1.0 in maintenance
)
def test_a_flood_during_apply_is_always_visible_and_ends_as_one_run_per_file(
    site: Site, count: int, restart: bool, minor: int
) -> None:
    # Given run 1 waiting in apply, and signed archives of the next versions among the files
    site.write_config(limits={"max_archive_bytes": 64 * 2**20})
    hold = site.root / "hold"
    hold.touch()
    migration = f'#!/bin/sh\nwhile [ -e "{hold}" ]; do sleep 0.1; done\n'
    first = site.pack(f"1.{minor}.{1 - minor}", files={"migrations/0.sh": migration}, migrations=["migrations/0.sh"])
    valid = [site.pack(f"1.{minor}.{patch}") for patch in range(2, 7)]
    names = flood_files(site, count, valid)
    daemon = site.start_daemon()
    site.drop(first)
    site.wait_step(1, "apply")
    # When the whole flood is renamed into the inbox at once
    for name in names:
        os.rename(site.root / "flood" / name, site.inbox / name)
    # Then while it is taken, every file is visible somewhere, and the daemon answers
    while True:
        visible = seen(site)
        missing = [name for name in names if name not in visible]
        assert not missing, f"{len(missing)} dropped files are shown nowhere, e.g. {missing[:3]}"
        assert site.metric("dropgate_maintenance_active") == float(minor)  # refusals say nothing of it
        if restart and site.status()["screening"]:
            break
        if not os.listdir(site.inbox) and not site.status()["screening"]:
            break
    if restart:  # killed in the middle of it all: the files being screened are screened again
        daemon.kill()
        hold.unlink()
        site.start_daemon()
        assert site.wait_outcome(1)["outcome"] == "interrupted"
        wait_for(lambda: not os.listdir(site.inbox) and not site.status()["screening"], what="the screening")
    # (nothing runs meanwhile: run 1 holds the gate, in apply or blocked): the backlog metric counts the queue
    waiting = len(site.status()["queued"])
    wait_for(lambda: site.metric("dropgate_inbox_files") == waiting, what=f"dropgate_inbox_files to read {waiting}")
    assert (site.metric("dropgate_inbox_oldest_age_seconds") or 0) > 0
    if restart:
        assert site.cli("resolve", "1", "--note", "the update is dropped again later").returncode == 0
    # And once run 1 is let go, each file ends as exactly one run
    hold.unlink(missing_ok=True)

    def finished() -> list[dict[str, object]] | None:
        result = site.cli("history", "--json", "--limit", "100000", timeout=60)
        runs = json.loads(result.stdout)
        return runs if len(runs) >= count + 1 and all(run["outcome"] for run in runs) else None

    runs = wait_for(finished, timeout=900, interval=2, what="every dropped file to end as a run")
    per_name = Counter(str(run["archive"]) for run in runs)
    assert per_name == Counter([first.name, *names]), "a file is missing or ran twice"
    assert os.listdir(site.inbox) == [] and site.status()["screening"] == []
    # the signed archives ran in the order they came (their versions' order), their misnamed copies never
    succeeded = sorted((float(str(r["started"])), str(r["archive"])) for r in runs if r["outcome"] == "succeeded")
    ran_first = [] if restart else [first.name]
    assert [name for _, name in succeeded] == [*ran_first, *(archive.name for archive in valid)]
    assert site.status()["installed_version"] == f"1.{minor}.6"
    reasons = Counter(str(run["error"]).split(" ", 2)[1] for run in runs if str(run["archive"]).endswith(".lnk"))
    assert reasons == Counter({"is": count // 20}), reasons  # "f00002.lnk is a symbolic link to ..."
    # and what monitoring reads agrees with the journal
    assert site.metric("dropgate_inbox_files") == 0.0
    assert site.metric("dropgate_gate", 'dropgate_gate="idle"') == 1.0
    if not restart:
        outcomes = Counter(str(run["outcome"]) for run in runs)
        for outcome in ("succeeded", "rejected", "failed", "rolled_back", "interrupted"):
            assert site.metric("dropgate_runs_total", f'outcome="{outcome}"') == outcomes.get(outcome, 0), outcome
    with urllib.request.urlopen(f"http://127.0.0.1:{site.port}/status.json", timeout=10) as response:
        page = json.loads(response.read())
    assert page["gate"] == "idle" and page["screening"] == [] and page["queued"] == []
