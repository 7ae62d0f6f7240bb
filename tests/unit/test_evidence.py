"""When the journal may be missing: only on a site without evidence of earlier runs."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.errors import JournalMissing
from pipeline.evidence import check_memory, journal_state, last_run_id, start_afresh
from pipeline.journal import Journal
from tests.conftest import Site


def test_a_fresh_site_needs_no_journal(site: Site) -> None:
    config = load_config(site.config_path)
    assert journal_state(site.state / "journal.db") == "missing"
    check_memory(config)  # the adopted first release alone is no evidence


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda site: (site.state / "spool" / "3").mkdir(parents=True), "1 spooled archive"),
        (lambda site: (site.state / "rejected").mkdir() or (site.state / "rejected" / "4-x.tgz").touch(), "rejected"),
        (lambda site: (site.state / "runs").mkdir() or (site.state / "runs" / "1.log").touch(), "1 run log"),
        (lambda site: (site.backups / "7").mkdir(), "1 snapshot"),
        (lambda site: (site.backups / ".8.partial").mkdir(), "1 snapshot"),
        (lambda site: (site.platform / "releases" / "1.0.1").mkdir(), "2 releases"),
        (lambda site: (site.state / "dropgate.lock").write_text("4242\n"), "last as pid 4242"),
        (lambda site: (site.state / "journal.db-wal").write_bytes(b"x"), "journal.db-wal"),
    ],
)
def test_each_kind_of_evidence_stops_a_start_without_journal(site: Site, make: object, named: str) -> None:
    make(site)  # type: ignore[operator]
    with pytest.raises(JournalMissing, match=named):
        check_memory(load_config(site.config_path))


def test_an_empty_lock_file_or_a_foreign_folder_among_backups_is_no_evidence(site: Site) -> None:
    (site.state / "dropgate.lock").touch()
    (site.backups / "lost+found").mkdir()
    check_memory(load_config(site.config_path))


def test_a_journal_without_runs_beside_spooled_runs_is_refused_until_started_afresh(site: Site) -> None:
    config = load_config(site.config_path)
    Journal(site.state / "journal.db").close()  # a valid, empty journal (as a wiped one would be)
    (site.state / "runs").mkdir()
    (site.state / "runs" / "12.log").touch()
    assert journal_state(site.state / "journal.db") == "no runs"
    with pytest.raises(JournalMissing, match="holds no runs"):
        check_memory(config)
    # the lock and several releases alone do not make an empty journal suspicious (a daemon that never ran a run)
    (site.state / "runs" / "12.log").unlink()
    (site.state / "dropgate.lock").write_text("1\n")
    check_memory(config)


@pytest.mark.parametrize(
    ("make", "last"),
    [
        (lambda site: None, 0),
        (lambda site: (site.state / "spool" / "3").mkdir(parents=True), 3),
        (lambda site: (site.state / "rejected").mkdir() or (site.state / "rejected" / "14-x.tgz").touch(), 14),
        (lambda site: (site.state / "runs").mkdir() or (site.state / "runs" / "9.log").touch(), 9),
        (lambda site: (site.backups / "27").mkdir(), 27),
        (lambda site: (site.backups / ".28.partial").mkdir(), 28),
    ],
)
def test_a_fresh_journal_numbers_its_runs_after_every_earlier_runs_trace(site: Site, make: object, last: int) -> None:
    # Given the traces of earlier runs (or none), and a journal started afresh over them
    make(site)  # type: ignore[operator]
    config = load_config(site.config_path)
    assert last_run_id(config) == last
    journal = start_afresh(config, "the disk with the journal was replaced")
    # When a new run is recorded, Then its id follows the highest trace: it shares no folder, log or snapshot
    assert journal.add_run("gts.1.0.1.tgz", spool=site.state / "spool", arrived=0.0) == last + 1
    assert ("run ids continue after" in journal.gate_events()[-1]["message"]) is (last > 0)
    journal.close()
