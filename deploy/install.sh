#!/usr/bin/env bash
# Install dropgate on a Debian 12 or RHEL 9 host, or bring an installation up
# to date. Safe to run again: each step says what it found and changes only
# what differs. Run it from an unpacked dropgate source tree, as root.
#
#   deploy/install.sh [--dry-run] [--wheelhouse DIR] [--python PATH] [--no-sshd]
#
#   --dry-run         print what would be done, change nothing (root not needed)
#   --wheelhouse DIR  install dropgate and its dependencies from wheels in DIR
#                     only, for a site without access to a package index; make
#                     it on a connected machine of the same OS and Python with
#                     `pip wheel --wheel-dir DIR SOURCE setuptools`
#   --python PATH     the interpreter for the venv (default: the newest
#                     python3.13/3.12/3.11 found; RHEL 9: dnf install python3.11)
#   --no-sshd         do not install the SFTP drop-in for the upload group
#
# What it does:
#   - groups dropgate-admin (may approve, retry, roll back, resolve, read
#     status) and dropgate-upload (may upload into the inbox over SFTP)
#   - a venv in /opt/dropgate/venv with dropgate, `dropgate` in /usr/bin
#   - /etc/dropgate/dropgate.yaml from the example, only if there is none
#   - the folders of deploy/systemd/dropgate-tmpfiles.conf, with their owners
#     and modes, and that file in /etc/tmpfiles.d so boot keeps them so
#   - the systemd unit (not enabled: edit the config first)
#   - the sshd drop-in, checked with `sshd -t` and removed again if it fails
#   - /etc/pam.d/dropgate for the console's sign-in (Debian's common-* stacks,
#     or RHEL's password-auth), only if there is none: a site's own is kept
#
# Every name and path is passed to commands as a separate argument, never
# through a shell string (no eval, no sh -c).

set -euo pipefail
umask 022

SOURCE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
DEPLOY="$SOURCE/deploy"
PREFIX=/opt/dropgate
VENV="$PREFIX/venv"
BIN_LINK=/usr/bin/dropgate
CONFIG_DIR=/etc/dropgate
CONFIG="$CONFIG_DIR/dropgate.yaml"
UNIT=/etc/systemd/system/dropgate.service
TMPFILES=/etc/tmpfiles.d/dropgate.conf
PAM_DIR=/etc/pam.d
SSHD_DROP_IN=/etc/ssh/sshd_config.d/dropgate-inbox.conf
GROUPS_NEEDED=(dropgate-admin dropgate-upload)

dry_run=0
wheelhouse=""
python=""
with_sshd=1

usage() {
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --wheelhouse) [ $# -ge 2 ] || { usage >&2; exit 2; }; wheelhouse=$2; shift ;;
        --python) [ $# -ge 2 ] || { usage >&2; exit 2; }; python=$2; shift ;;
        --no-sshd) with_sshd=0 ;;
        -h|--help) usage; exit 0 ;;
        *) printf 'install.sh: unknown argument: %q\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { printf '%s\n' "$*"; }

# Run a command given as separate arguments, or only print it in a dry run.
run() {
    if [ "$dry_run" = 1 ]; then
        printf 'would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        printf 'run:'
        printf ' %q' "$@"
        printf '\n'
        "$@"
    fi
}

die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

if [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (or with --dry-run to see what it would do)"
fi
[ -f "$SOURCE/pyproject.toml" ] && [ -d "$SOURCE/pipeline" ] || die "$SOURCE is not a dropgate source tree"
if [ -n "$wheelhouse" ] && [ ! -d "$wheelhouse" ]; then
    die "--wheelhouse $wheelhouse is not a folder"
fi

# -- the interpreter ------------------------------------------------------------
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ -n "$python" ]; then
    python_ok "$python" || die "$python is not Python 3.11 or newer"
else
    # The system's interpreters first: the service must not depend on a
    # per-user Python (pyenv, conda) that happens to be on root's PATH.
    for candidate in python3.13 python3.12 python3.11 python3; do
        for found in "/usr/bin/$candidate" "/usr/local/bin/$candidate" "$(command -v "$candidate" || true)"; do
            if [ -n "$found" ] && [ -x "$found" ] && python_ok "$found"; then
                python=$found
                break 2
            fi
        done
    done
    [ -n "$python" ] || die "dropgate needs Python 3.11 or newer (Debian 12: python3; RHEL 9: dnf install python3.11)"
fi
say "python: $python ($("$python" -c 'import platform; print(platform.python_version())'))"
if [ ! -x "$VENV/bin/python" ] && ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    die "$python cannot make a venv (Debian: apt-get install python3-venv; RHEL: dnf install python3.11)"
fi

# -- groups -----------------------------------------------------------------------
for group in "${GROUPS_NEEDED[@]}"; do
    if getent group "$group" >/dev/null; then
        say "group $group: exists"
    else
        run groupadd --system "$group"
    fi
done

# -- files: copy only when different --------------------------------------------------
# install_file SOURCE TARGET MODE OWNER GROUP
install_file() {
    local source=$1 target=$2 mode=$3 owner=$4 group=$5
    if [ -f "$target" ] && cmp -s -- "$source" "$target"; then
        say "$target: up to date"
        if [ "$(stat -c '%a %U %G' -- "$target")" != "${mode#0} $owner $group" ]; then
            run chown -- "$owner:$group" "$target"
            run chmod -- "$mode" "$target"
        fi
    else
        run install -D -m "$mode" -o "$owner" -g "$group" -- "$source" "$target"
    fi
}

# ensure_dir PATH MODE OWNER GROUP
ensure_dir() {
    local path=$1 mode=$2 owner=$3 group=$4
    if [ -d "$path" ]; then
        if [ "$(stat -c '%a %U %G' -- "$path")" = "${mode#0} $owner $group" ]; then
            say "$path/: $mode $owner:$group"
            return
        fi
    else
        run mkdir -p -- "$path"
    fi
    run chown -- "$owner:$group" "$path"
    run chmod -- "$mode" "$path"
}

# -- the venv and the command --------------------------------------------------------
ensure_dir "$PREFIX" 0755 root root
if [ -x "$VENV/bin/python" ]; then
    say "$VENV: exists"
else
    run "$python" -m venv -- "$VENV"
fi
pip_args=(install --quiet --upgrade)
if [ -n "$wheelhouse" ]; then
    pip_args+=(--no-index --find-links "$wheelhouse")
fi
# pip builds in the folder it is given: build from a copy, so that a source
# tree on read-only media (or shared with others) is never written to.
if [ "$dry_run" = 1 ]; then
    say "would copy pyproject.toml, pipeline/ and states/ of $SOURCE to a temporary build folder"
    run "$VENV/bin/python" -m pip "${pip_args[@]}" -- "${TMPDIR:-/tmp}/tmp.XXXXXXXXXX"
else
    build=$(mktemp -d)
    trap 'rm -rf -- "$build"' EXIT
    for part in pyproject.toml README.md LICENSE pipeline states; do
        if [ -e "$SOURCE/$part" ]; then
            cp -R -- "$SOURCE/$part" "$build/"
        fi
    done
    run "$VENV/bin/python" -m pip "${pip_args[@]}" -- "$build"
fi
if [ "$(readlink -- "$BIN_LINK" 2>/dev/null || true)" = "$VENV/bin/dropgate" ]; then
    say "$BIN_LINK -> $VENV/bin/dropgate: exists"
else
    run ln -sfn -- "$VENV/bin/dropgate" "$BIN_LINK"
fi
# The docs and the monitoring files, for reference on the host.
for doc in "$SOURCE"/docs/*.md; do
    [ -e "$doc" ] || continue
    install_file "$doc" "$PREFIX/share/doc/$(basename -- "$doc")" 0644 root root
done
for file in prometheus/dropgate.rules.yml prometheus/prometheus.example.yml grafana/dropgate.json \
    nginx/dropgate-maintenance.conf nginx/maintenance.html; do
    case "$file" in
        nginx/*) install_file "$DEPLOY/$file" "$PREFIX/share/$file" 0644 root root ;;
        *) install_file "$DEPLOY/$file" "$PREFIX/share/deploy/$file" 0644 root root ;;
    esac
done

# -- configuration: never overwritten ---------------------------------------------------
ensure_dir "$CONFIG_DIR" 0750 root dropgate-admin
ensure_dir "$CONFIG_DIR/keys" 0750 root dropgate-admin
if [ -e "$CONFIG" ]; then
    say "$CONFIG: exists, left as it is (the example is in $PREFIX/share/dropgate.example.yaml)"
else
    install_file "$SOURCE/config/dropgate.example.yaml" "$CONFIG" 0640 root dropgate-admin
fi
install_file "$SOURCE/config/dropgate.example.yaml" "$PREFIX/share/dropgate.example.yaml" 0644 root root

# -- folders: the tmpfiles entries are the one list of them -------------------------------
install_file "$DEPLOY/systemd/dropgate-tmpfiles.conf" "$TMPFILES" 0644 root root
while read -r type path mode owner group _age; do
    case "$type" in
        d) ensure_dir "$path" "$mode" "$owner" "$group" ;;
        ''|'#'*) ;;
        *) die "dropgate-tmpfiles.conf: unexpected entry type $type for $path" ;;
    esac
done < "$DEPLOY/systemd/dropgate-tmpfiles.conf"
if command -v restorecon >/dev/null 2>&1; then  # SELinux (RHEL): default labels on the new folders
    run restorecon -R -- /var/lib/dropgate /var/backups/dropgate "$CONFIG_DIR" "$PREFIX"
fi

# -- systemd ------------------------------------------------------------------------------
unit_changed=0
if [ -f "$UNIT" ] && cmp -s -- "$DEPLOY/systemd/dropgate.service" "$UNIT"; then
    say "$UNIT: up to date"
else
    install_file "$DEPLOY/systemd/dropgate.service" "$UNIT" 0644 root root
    unit_changed=1
fi
if [ "$unit_changed" = 1 ] && [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
fi

# -- PAM (the console's sign-in) ------------------------------------------------------------
# Never overwritten: a site may have tightened it (e.g. added pam_faillock).
if [ -e "$PAM_DIR/dropgate" ]; then
    say "$PAM_DIR/dropgate: exists, left as it is"
elif [ -e "$PAM_DIR/common-auth" ]; then
    install_file "$DEPLOY/pam/dropgate" "$PAM_DIR/dropgate" 0644 root root
elif [ -e "$PAM_DIR/password-auth" ]; then  # RHEL: the stacks named in the file's own comment
    pam_build=$(mktemp)
    sed -e 's/^@include common-auth$/auth     include  password-auth/' \
        -e 's/^@include common-account$/account  include  password-auth/' -- "$DEPLOY/pam/dropgate" > "$pam_build"
    install_file "$pam_build" "$PAM_DIR/dropgate" 0644 root root
    rm -f -- "$pam_build"
else
    say "$PAM_DIR has neither common-auth nor password-auth: write $PAM_DIR/dropgate by hand (see $DEPLOY/pam/dropgate)"
fi

# -- sshd -----------------------------------------------------------------------------------
if [ "$with_sshd" = 1 ]; then
    sshd=$(command -v sshd || true)
    [ -n "$sshd" ] || [ ! -x /usr/sbin/sshd ] || sshd=/usr/sbin/sshd
    if [ -z "$sshd" ]; then
        say "sshd not installed: skipping the SFTP drop-in (install openssh-server, then run this again)"
    elif [ -f "$SSHD_DROP_IN" ] && cmp -s -- "$DEPLOY/sshd/dropgate-inbox.conf" "$SSHD_DROP_IN"; then
        say "$SSHD_DROP_IN: up to date"
    else
        had_drop_in=0
        [ -f "$SSHD_DROP_IN" ] && had_drop_in=1
        install_file "$DEPLOY/sshd/dropgate-inbox.conf" "$SSHD_DROP_IN" 0644 root root
        if [ "$dry_run" = 1 ]; then
            say "would check: $sshd -t"
        elif ! "$sshd" -t; then
            [ "$had_drop_in" = 1 ] || rm -f -- "$SSHD_DROP_IN"
            die "sshd -t refused the configuration with $SSHD_DROP_IN; fix it, then run this again"
        else
            for service in ssh sshd; do
                if systemctl is-active --quiet "$service" 2>/dev/null; then
                    run systemctl reload "$service"
                    break
                fi
            done
        fi
    fi
fi

say ""
if [ "$dry_run" = 1 ]; then
    say "dry run: nothing was changed"
else
    say "dropgate is installed. Next:"
    say "  1. edit $CONFIG (platform, trust.keys in $CONFIG_DIR/keys, services, verify)"
    say "  2. dropgate init --adopt DIR --version V   (the platform's installed release)"
    say "  3. dropgate preflight"
    say "  4. systemctl enable --now dropgate"
    say "  5. add operators to dropgate-admin, uploaders to dropgate-upload (usermod -aG GROUP USER)"
    say "  6. nginx: include $PREFIX/share/nginx/dropgate-maintenance.conf in the platform's server block"
    say "  7. monitoring: $PREFIX/share/deploy/ has the Prometheus rules and the Grafana dashboard"
fi
