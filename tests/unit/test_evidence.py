"""When the journal may be missing: only on a site without evidence of earlier runs."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.errors import JournalMissing
from pipeline.evidence import check_memory, journal_state
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
