#!/usr/bin/env bash
# Bring the machine up to what `make test` and `make demo` need, and do nothing
# when it already is: the Debian packages (a real Dovecot and the real mail
# clients the tests drive) and the project's virtualenv in .venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(
    dovecot-core dovecot-pop3d dovecot-imapd dovecot-submissiond
    curl fetchmail mpop msmtp swaks openssl haproxy
    prometheus fail2ban
    chromium chromium-driver
    postgresql
    libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl
    python3-venv
)
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed-pyproject

say() { printf 'ensure-deps: %s\n' "$*" >&2; }

missing_packages() {
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) != "install ok installed" ]]; then
            printf '%s\n' "$pkg"
        fi
    done
}

# A system Dovecot that apt just started is not ours: the tests run their own
# instances on high ports, but nothing should be left listening on 110/143.
stop_system_dovecot() {
    [[ -e /run/dovecot/master.pid ]] || return 0
    say "stopping the system Dovecot that the package installation started"
    systemctl stop dovecot 2>/dev/null || service dovecot stop 2>/dev/null \
        || doveadm stop 2>/dev/null || say "could not stop it; it does not conflict with the tests"
}

ensure_packages() {
    if ! command -v dpkg-query >/dev/null; then
        say "not a Debian system; install the equivalents of: ${PACKAGES[*]}"
        command -v dovecot >/dev/null || command -v /usr/sbin/dovecot >/dev/null
        return
    fi
    local missing
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]} == 0)) && return 0
    if ((EUID != 0)); then
        say "missing Debian packages: ${missing[*]}"
        say "install them with:  sudo apt-get update && sudo apt-get install -y ${missing[*]}"
        exit 1
    fi
    say "installing ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    stop_system_dovecot
}

ensure_venv() {
    if [[ ! -x $VENV/bin/python ]]; then
        say "creating $VENV with $($PYTHON --version 2>&1)"
        "$PYTHON" -m venv "$VENV"
    fi
    if [[ ! -e $STAMP || pyproject.toml -nt $STAMP ]]; then
        say "installing the project and its test dependencies into $VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        # Compat editable mode puts the repo root on sys.path (a .pth file):
        # twistd finds twisted/plugins/ by scanning sys.path, which the
        # default strict editable finder hides.
        "$VENV/bin/python" -m pip install --quiet -e '.[test]' \
            --config-settings editable_mode=compat
        rm -f "$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')/gateway-repo.pth"
        touch "$STAMP"
    fi
}

# initdb and postgres refuse to run as root: the tests' throwaway clusters
# belong to this unprivileged user when the suite runs as root (CI does).
ensure_pg_user() {
    if [[ $(id -u) -eq 0 ]] && ! id pgtest >/dev/null 2>&1; then
        useradd --system --no-create-home pgtest
    fi
}

ensure_packages
ensure_pg_user
ensure_venv
