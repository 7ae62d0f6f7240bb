"""The console's reject form and automatic-updates switch, sent through the daemon's control dispatch.

They send exactly the control requests `dropgate reject ID --note TEXT` and
`dropgate auto-update on|off` send ({"command": "reject", "id", "note"} and
{"command": "auto-update", "enabled"}), so they work once the daemon's
dispatch has those commands; until then the daemon answers "unknown command"
and these tests fail on purpose, saying so.
"""

from __future__ import annotations

import re

from tests.conftest import Site, wait_for
from tests.console_helpers import Accounts, client, console_config, wait_console


def flash(page: str) -> str:
    match = re.search(r'<p class="flash (?:good|bad)" role="status">([^<]*)</p>', page)
    return match.group(1) if match else ""


def test_reject_with_a_note_from_the_console_ends_the_waiting_run_as_rejected_and_records_who(
    site: Site, accounts: Accounts
) -> None:
    # Given a run waiting for approval
    site.write_config(policy={"require_approval": True})
    port = console_config(site, accounts)
    site.start_daemon()
    wait_console(port)
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        # The run page offers Reject, behind a confirmation that says what it does and asks for a note
        assert 'href="/runs/1/reject"' in http.get("/runs/1").text
        confirm = http.get("/runs/1/reject").text
        assert "it ends as rejected; the platform is not touched" in confirm and 'name="note"' in confirm
        token = re.search(r'name="csrf" value="([^"]+)"', confirm).group(1)  # type: ignore[union-attr]
        # When rejected without a note, Then nothing is sent
        assert http.post("/runs/1/reject", data={"csrf": token, "note": ""}).headers["location"] == "/runs/1/reject"
        assert site.run(1)["step"] == "approval"  # type: ignore[index]
        # When rejected with a note
        answer = http.post("/runs/1/reject", data={"csrf": token, "note": "the date was not agreed with IT"})
        message = flash(http.get(answer.headers["location"]).text)
        assert "unknown command" not in message, (
            "the daemon's control dispatch has no 'reject' yet (it comes with the feed work): " + message
        )
    # Then the run is rejected, the platform untouched, and the journal names who did it, from where, and why
    run = site.wait_outcome(1)
    assert run["outcome"] == "rejected"
    assert (site.platform / "current").resolve().name == "1.0.0"
    events = " | ".join(e["message"] for e in site.show(1)["events"])
    assert f"{accounts.admin} from 127.0.0.1 (console)" in events
    assert "the date was not agreed with IT" in events


def test_the_automatic_updates_switch_goes_through_the_daemon_and_survives_a_restart(
    site: Site, accounts: Accounts
) -> None:
    port = console_config(site, accounts)
    # a vendor feed (nothing answers there: the first check is due at midnight, not when switched on)
    site.write_config(auto_update={"feed": "https://127.0.0.1:9/gts/feed.json"})
    site.start_daemon()
    wait_console(port)
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        assert 'id="auto-update">off<' in http.get("/").text
        confirm = http.get("/auto-update?enabled=true").text
        assert "Turn automatic updates ON" in confirm
        token = re.search(r'name="csrf" value="([^"]+)"', confirm).group(1)  # type: ignore[union-attr]
        # When the administrator turns automatic updates on
        answer = http.post("/auto-update", data={"csrf": token, "enabled": "true"})
        message = flash(http.get(answer.headers["location"]).text)
        assert message.startswith("automatic updates are ON"), message
        # Then the site's switch is on: the metric and the overview say so
        wait_for(lambda: site.metric("dropgate_auto_update_enabled") == 1.0, what="the switch's metric to read 1")
        assert 'id="auto-update">on<' in http.get("/").text
    # and it survives a restart of the daemon
    site.daemons[0].stop()
    site.start_daemon()
    wait_console(port)
    wait_for(lambda: site.metric("dropgate_auto_update_enabled") == 1.0, what="the switch to be on after a restart")
    with client(port) as http:
        assert http.sign_in(accounts.admin, accounts.admin_password).status_code == 303
        assert 'id="auto-update">on<' in http.get("/").text
        token = http.csrf("/auto-update?enabled=false")
        http.post("/auto-update", data={"csrf": token, "enabled": "false"})
        wait_for(lambda: site.metric("dropgate_auto_update_enabled") == 0.0, what="the switch's metric to read 0")
