"""The `dropgate` command (also `python -m pipeline`).

Exit codes: 0 ok, 1 the thing asked for is not ok, 2 usage or configuration
error, 3 daemon not reachable (not running, or not answering: frozen or
overloaded), 4 not allowed (this user may not read the configuration or the
state folder, or use the control socket: root and the admin group may),
5 the journal is missing or damaged (the gate's state is unknown; `run`
refuses to start, see `pipeline.evidence`).
Read-only commands work from the journal even when the daemon is down;
commands that change something go through the daemon. Errors are one line,
with names escaped (they may come from uploaders and archives).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from pipeline.errors import ConfigError, DaemonUnreachable, DropgateError, JournalDamaged, JournalMissing, NotAllowed
from pipeline.terminal import printable

EXIT_OK, EXIT_NOT_OK, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NOT_ALLOWED = 0, 1, 2, 3, 4
EXIT_NO_JOURNAL = 5  # same value as pipeline.evidence.EXIT_NO_JOURNAL (not imported: the CLI starts light)

Handler = Callable[[argparse.Namespace], int]

# command -> "module:function"; modules are imported only when their command runs.
_HANDLERS = {
    "run": "pipeline.daemon:cmd_run",
    "status": "pipeline.report:cmd_status",
    "history": "pipeline.report:cmd_history",
    "show": "pipeline.report:cmd_show",
    "preflight": "pipeline.preflight:cmd_preflight",
    "approve": "pipeline.control:cmd_approve",
    "retry": "pipeline.control:cmd_retry",
    "rollback": "pipeline.control:cmd_rollback",
    "resolve": "pipeline.control:cmd_resolve",
    "reject": "pipeline.control:cmd_reject",
    "auto-update": "pipeline.control:cmd_auto_update",
    "feed": "pipeline.offers:cmd_feed",
    "keygen": "pipeline.vendor:cmd_keygen",
    "pack": "pipeline.vendor:cmd_pack",
    "verify": "pipeline.vendor:cmd_verify",
    "graph": "pipeline.runner:cmd_graph",
    "demo": "pipeline.demo:cmd_demo",
    "init": "pipeline.release:cmd_init",
    "backups": "pipeline.backups:cmd_backups",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dropgate", description="The update gate of an on-premise platform.")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: $DROPGATE_CONFIG, then /etc/dropgate/dropgate.yaml)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, *, json: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if json:
            sub.add_argument("--json", action="store_true", help="print machine-readable JSON")
        return sub

    sub = command("run", "run the daemon in the foreground (systemd Type=notify)")
    sub.add_argument(
        "--check",
        action="store_true",
        help="only validate the configuration, then exit: 0 valid, 2 not (like sshd -t; starts nothing)",
    )
    sub.add_argument(
        "--fresh-journal",
        metavar="NOTE",
        help="the journal is lost: start with an empty one on purpose (recorded with NOTE); see README",
    )
    sub = command("status", "the gate, the current run, its step and progress", json=True)
    sub.add_argument("--watch", action="store_true", help="redraw live until interrupted")
    sub.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    sub = command("history", "past runs, newest first", json=True)
    sub.add_argument("--limit", type=int, default=50, help="how many runs (default 50)")
    sub = command("show", "one run with its events", json=True)
    sub.add_argument("id", type=int)
    sub.add_argument("--log", action="store_true", help="also print the tail of the run's log")
    sub.add_argument("--lines", type=int, default=40, help="how many log lines with --log (default 40)")
    sub = command("preflight", "the server check; with an archive, also what the update would do", json=True)
    sub.add_argument("archive", nargs="?", help="an update archive to preview")
    sub = command("approve", "let a run waiting in approval continue")
    sub.add_argument("id", type=int)
    sub = command("retry", "run a rejected or failed archive again, explicitly")
    sub.add_argument("id", type=int)
    sub = command("rollback", "put the platform back to its state before run ID (default: the last failed)")
    sub.add_argument("id", type=int, nargs="?")
    sub = command("resolve", "confirm the platform is fine after a failure; unblocks the gate")
    sub.add_argument("id", type=int)
    sub.add_argument("--note", required=True, help="what was checked or repaired (kept in the journal)")
    sub = command("reject", "refuse a run waiting in approval or window (recorded as rejected by you)")
    sub.add_argument("id", type=int)
    sub.add_argument("--note", required=True, help="why (kept in the journal)")
    sub = command("auto-update", "switch the nightly fetch from the vendor's feed on or off (kept across restarts)")
    sub.add_argument("state", choices=["on", "off"])
    sub = command("feed", "what the vendor's feed offers and what would be fetched next", json=True)
    actions = sub.add_subparsers(dest="feed_action", metavar="ACTION")
    build = actions.add_parser(
        "build", help="vendor side: a signed feed of the archives in DIR", description="vendor side: build a feed"
    )
    build.add_argument("dir", help="a folder of signed archives (each is read from its signed head)")
    build.add_argument("--key", required=True, help="the private key file (archives must be signed by it)")
    build.add_argument("--base-url", required=True, help="where the archives are served (https://..., or a path)")
    build.add_argument("-o", "--out", required=True, help="the feed file to write")
    build.add_argument("--sequence", type=int, help="the feed's sequence number (default: the current Unix time)")
    build.add_argument("--expires", default="7d", help="how long sites accept it (default 7d)")
    verify = actions.add_parser(
        "verify", help="vendor side: check a feed as a site would", description="check a feed as a site would"
    )
    verify.add_argument("feed")
    verify.add_argument("--key", action="append", required=True, help="a trusted public key file (repeatable)")
    verify.add_argument("--json", action="store_true", help="print machine-readable JSON")
    sub = command("keygen", "vendor side: make an Ed25519 key pair")
    sub.add_argument(
        "-o", "--out", required=True, metavar="PREFIX", help="writes PREFIX.key (private, 0600) and PREFIX.pub"
    )
    sub.add_argument("--force", action="store_true", help="overwrite an existing key")
    sub = command("pack", "vendor side: build and sign an update archive from DIR/manifest.yaml")
    sub.add_argument("dir")
    sub.add_argument("--key", required=True, help="the private key file")
    sub.add_argument(
        "-o", "--out", required=True, help="the archive (or a folder to write <product>.<version>.tgz into)"
    )
    sub = command("verify", "vendor side: check an archive against a public key and say what is wrong", json=True)
    sub.add_argument("archive")
    sub.add_argument("--key", action="append", required=True, help="a trusted public key file (repeatable)")
    command("graph", "print the state machine as Mermaid")
    sub = command("demo", "a self-contained sandbox site for a first look")
    sub.add_argument("--dir", help="where to build the sandbox (default: ./demo-site)")
    sub.add_argument(
        "--once", action="store_true", help="run the sample updates, then exit 0 only if every outcome was as expected"
    )
    sub.add_argument("--port", type=int, default=0, help="status page port (default: a free one)")
    sub = command("init", "create the folders and adopt an existing installation as the first release")
    sub.add_argument("--adopt", metavar="DIR", help="an existing installation to adopt as the first release")
    sub.add_argument(
        "--version", dest="adopt_version", metavar="VERSION", help="the version of the adopted installation"
    )
    sub.add_argument("--copy", action="store_true", help="copy the installation instead of moving it")
    sub = command("backups", "list snapshots; `backups verify ID` re-checks one", json=True)
    sub.add_argument("action", nargs="?", choices=["list", "verify"], default="list")
    sub.add_argument("id", type=int, nargs="?")
    return parser


def _handler(name: str) -> Handler:
    module_name, _, function = _HANDLERS[name].partition(":")
    handler: Handler = getattr(importlib.import_module(module_name), function)
    return handler


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (what `| head` does): poll says POLLERR."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _handler(args.command)(args)
    except ConfigError as error:
        print(f"dropgate: configuration error: {printable(error)}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonUnreachable as error:
        print(f"dropgate: {printable(error)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (JournalMissing, JournalDamaged) as error:
        print(f"dropgate: {printable(error)}", file=sys.stderr)
        return EXIT_NO_JOURNAL
    except NotAllowed as error:
        print(f"dropgate: not allowed: {printable(error)}", file=sys.stderr)
        return EXIT_NOT_ALLOWED
    except DropgateError as error:
        print(f"dropgate: {printable(error)}", file=sys.stderr)
        return EXIT_NOT_OK
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError as error:
        if _stdout_closed():
            # `dropgate history | head`: the reader has had enough; no traceback for that.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        # Another pipe or socket broke (never reported as success).
        print(f"dropgate: {printable(error)}", file=sys.stderr)
        return EXIT_NOT_OK


def entry() -> None:
    sys.exit(main())
