#!/usr/bin/env bash
# Private PostgreSQL 15 instance for wallaby development, demos and tests.
#
# Usage: e2e/pg.sh [start|stop|status|dsn|env|psql [args...]|destroy]
#
#   start    (default) initialise if needed, start, print the DSN as the last
#            stdout line (everything else goes to stderr):  DSN=$(e2e/pg.sh start)
#   stop     fast shutdown (no-op if not running)
#   status   print state; exit 0 if running, 3 otherwise
#   dsn      print postgres://wallaby:wallaby@127.0.0.1:<port>/wallaby (running only)
#   env      print shell exports (eval "$(e2e/pg.sh env)")
#   psql     run psql as superuser over the unix socket, extra args passed through
#   destroy  stop and delete the state directory
#
# Environment:
#   WALLABY_PG_DIR        state directory (default <repo>/.state/pg)
#   WALLABY_PG_PORT       TCP port (default: stored port, else first free from 55432)
#   WALLABY_PG_WAL_LEVEL  wal_level (default: stored value, else logical)
#
# The Debian system cluster (pg_ctlcluster, port 5432) is never used or touched.
set -euo pipefail
umask 022

readonly PG_BIN=/usr/lib/postgresql/15/bin
readonly PG_USER_OS=postgres
readonly BASE_PORT=55432
readonly APP_USER=wallaby APP_PASS=wallaby APP_DB=wallaby
readonly SUPER_USER=postgres SUPER_PASS=postgres
readonly MARKER=.wallaby-pg

SCRIPT_PATH=$(readlink -f -- "${BASH_SOURCE[0]}")
REPO=$(dirname -- "$(dirname -- "$SCRIPT_PATH")")
readonly SCRIPT_PATH REPO

log() { printf 'pg.sh: %s\n' "$*" >&2; }
die() { printf 'pg.sh: error: %s\n' "$*" >&2; exit 1; }

is_root() { [[ $EUID -eq 0 ]]; }

# Run a command as the OS user that owns the cluster (postgres when we are
# root, because initdb/pg_ctl/postgres refuse to run as root).
as_pg() {
    if is_root; then
        if command -v runuser >/dev/null 2>&1; then
            (cd / && runuser -u "$PG_USER_OS" -- "$@")
        else
            local cmd
            cmd=$(printf '%q ' "$@")
            (cd / && su "$PG_USER_OS" -s /bin/bash -c "$cmd")
        fi
    else
        (cd / && "$@")
    fi
}

pg_os_user_exists() { id -u "$PG_USER_OS" >/dev/null 2>&1; }

# ---------------------------------------------------------------- install ---

ensure_installed() {
    [[ -x $PG_BIN/initdb && -x $PG_BIN/pg_ctl && -x $PG_BIN/psql ]] && return 0
    local -a sudo=()
    if ! is_root; then
        command -v sudo >/dev/null 2>&1 ||
            die "PostgreSQL 15 is not installed ($PG_BIN/initdb missing) and we are neither root nor have sudo; run as root: apt-get install -y --no-install-recommends postgresql-15 postgresql-client-15"
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "PostgreSQL 15 is not installed ($PG_BIN/initdb missing) and apt-get is not available; install PostgreSQL 15 manually"
    local -a install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 postgresql-client-15)
    log "installing PostgreSQL 15 via apt-get"
    if ! "${sudo[@]}" "${install[@]}" >&2; then
        log "apt-get install failed; retrying after apt-get update"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update >&2 ||
            die "apt-get update failed"
        "${sudo[@]}" "${install[@]}" >&2 || die "apt-get install of postgresql-15 failed"
    fi
    [[ -x $PG_BIN/initdb ]] || die "$PG_BIN/initdb still missing after installation"
}

ensure_pg_os_user() {
    is_root || return 0
    pg_os_user_exists && return 0
    log "creating OS user $PG_USER_OS"
    useradd --system --home /var/lib/postgresql --shell /bin/bash "$PG_USER_OS" ||
        die "could not create OS user $PG_USER_OS"
}

# -------------------------------------------------------------- state dir ---

STATE='' DATA='' RUN_DIR='' LOGFILE='' PORT_FILE='' WAL_FILE=''
FALLBACK_NOTE=''

# Nearest existing ancestor of a path (the path itself if it exists).
existing_ancestor() {
    local p=$1
    while [[ ! -e $p ]]; do p=$(dirname -- "$p"); done
    printf '%s\n' "$p"
}

# Can the postgres OS user reach (search) the given path?
pg_can_reach() {
    local a
    a=$(existing_ancestor "$1")
    as_pg test -x "$a" 2>/dev/null
}

resolve_state() {
    local dir
    if [[ -n ${WALLABY_PG_DIR:-} ]]; then
        dir=$(realpath -m -- "$WALLABY_PG_DIR")
        if is_root && pg_os_user_exists && ! pg_can_reach "$dir"; then
            die "WALLABY_PG_DIR=$dir is not reachable by OS user $PG_USER_OS (needed when running as root); choose a directory under /var/tmp or /tmp"
        fi
    else
        dir=$REPO/.state/pg
        if is_root && pg_os_user_exists && ! pg_can_reach "$dir"; then
            local hash
            hash=$(printf '%s' "$REPO" | sha256sum | cut -c1-12)
            FALLBACK_NOTE="OS user $PG_USER_OS cannot reach $dir; using /var/tmp/wallaby-pg-$hash instead"
            dir=/var/tmp/wallaby-pg-$hash
        fi
    fi
    [[ $dir != / ]] || die "refusing to use / as state directory"
    STATE=$dir
    DATA=$STATE/data
    RUN_DIR=$STATE/run
    LOGFILE=$STATE/postgres.log
    PORT_FILE=$STATE/port
    WAL_FILE=$STATE/wal_level
}

# Make a file/dir owned by the cluster owner when running as root.
give_to_pg() { if is_root; then chown "$PG_USER_OS": "$@"; fi; }

prepare_state_dir() {
    mkdir -p -- "$STATE" || die "cannot create $STATE"
    # Self-ignoring .state directory when it lives inside the repo.
    if [[ $STATE == "$REPO"/.state/* && ! -e $REPO/.state/.gitignore ]]; then
        printf '*\n' >"$REPO/.state/.gitignore" || true
    fi
    if [[ ! -e $STATE/$MARKER ]]; then
        if [[ -n $(ls -A -- "$STATE") ]]; then
            die "$STATE exists, is not empty and was not created by pg.sh; refusing to use it"
        fi
        printf 'PostgreSQL state managed by %s\n' "$SCRIPT_PATH" >"$STATE/$MARKER"
    fi
    mkdir -p -- "$RUN_DIR"
    give_to_pg "$STATE" "$RUN_DIR" "$STATE/$MARKER"
    [[ -w $STATE ]] || die "$STATE is not writable"
}

take_lock() {
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>"$STATE/.lock"
    flock -w 120 9 || die "timed out waiting for lock $STATE/.lock"
}

# ---------------------------------------------------------------- queries ---

initialized() { [[ -f $DATA/PG_VERSION ]]; }

running() {
    initialized || return 1
    as_pg "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

# Port of the running server (from postmaster.pid), else the stored port.
current_port() {
    local p
    p=$(sed -n 4p "$DATA/postmaster.pid" 2>/dev/null || true)
    if [[ ! $p =~ ^[0-9]+$ && -f $PORT_FILE ]]; then p=$(<"$PORT_FILE"); fi
    printf '%s\n' "$p"
}

app_dsn() { printf 'postgres://%s:%s@127.0.0.1:%s/%s\n' "$APP_USER" "$APP_PASS" "$1" "$APP_DB"; }
super_dsn() { printf 'postgres://%s:%s@127.0.0.1:%s/postgres\n' "$SUPER_USER" "$SUPER_PASS" "$1"; }

require_running() {
    running || die "PostgreSQL is not running (state dir $STATE); run: $SCRIPT_PATH start"
}

# Ports that failed to bind during this start (see cmd_start).
SKIP_PORTS=()

port_in_use() {
    local p=$1 skipped
    for skipped in "${SKIP_PORTS[@]}"; do
        [[ $skipped == "$p" ]] && return 0
    done
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then return 0; fi
    if command -v ss >/dev/null 2>&1 && [[ -n $(ss -Hltn "sport = :$p" 2>/dev/null) ]]; then
        return 0
    fi
    return 1
}

valid_port() { [[ $1 =~ ^[0-9]+$ ]] && ((1 <= $1 && $1 <= 65535)); }

choose_port() {
    local p
    if [[ -n ${WALLABY_PG_PORT:-} ]]; then
        valid_port "$WALLABY_PG_PORT" || die "invalid WALLABY_PG_PORT=$WALLABY_PG_PORT"
        port_in_use "$WALLABY_PG_PORT" && die "WALLABY_PG_PORT=$WALLABY_PG_PORT is already in use on 127.0.0.1"
        printf '%s\n' "$WALLABY_PG_PORT"
        return
    fi
    if [[ -f $PORT_FILE ]]; then
        p=$(<"$PORT_FILE")
        if valid_port "$p"; then
            if ! port_in_use "$p"; then printf '%s\n' "$p"; return; fi
            log "stored port $p is in use by something else; choosing a new port"
        fi
    fi
    for ((p = BASE_PORT; p < BASE_PORT + 1000; p++)); do
        if ! port_in_use "$p"; then printf '%s\n' "$p"; return; fi
    done
    die "no free TCP port found in $BASE_PORT..$((BASE_PORT + 999))"
}

choose_wal_level() {
    local w=${WALLABY_PG_WAL_LEVEL:-}
    if [[ -z $w && -f $WAL_FILE ]]; then w=$(<"$WAL_FILE"); fi
    w=${w:-logical}
    case $w in minimal | replica | logical) ;; *) die "invalid WALLABY_PG_WAL_LEVEL=$w (minimal|replica|logical)" ;; esac
    printf '%s\n' "$w"
}

# ------------------------------------------------------------------ setup ---

pick_locale() {
    if command -v locale >/dev/null 2>&1 && locale -a 2>/dev/null | grep -qix 'c\.utf-\?8'; then
        echo C.UTF-8
    else
        echo C
    fi
}

do_initdb() {
    local tmp=$STATE/data.init pw loc
    rm -rf -- "$tmp"
    pw=$STATE/.pwfile
    printf '%s\n' "$SUPER_PASS" >"$pw"
    chmod 600 "$pw"
    give_to_pg "$pw"
    loc=$(pick_locale)
    log "initdb $DATA (locale $loc)"
    if ! as_pg "$PG_BIN/initdb" -D "$tmp" -U "$SUPER_USER" --pwfile="$pw" \
        --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale="$loc" --no-instructions >&2; then
        rm -f -- "$pw"
        rm -rf -- "$tmp"
        die "initdb failed"
    fi
    rm -f -- "$pw"

    cat >"$tmp/pg_hba.conf" <<'EOF'
# Managed by e2e/pg.sh
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 trust
local   replication  all                 trust
host    all          all   127.0.0.1/32  scram-sha-256
host    all          all   ::1/128       scram-sha-256
host    replication  all   127.0.0.1/32  scram-sha-256
host    replication  all   ::1/128       scram-sha-256
EOF
    printf "\n# Added by e2e/pg.sh; wallaby.conf is regenerated on every start\ninclude = 'wallaby.conf'\n" \
        >>"$tmp/postgresql.conf"
    give_to_pg "$tmp/pg_hba.conf" "$tmp/postgresql.conf"
    as_pg mv -- "$tmp" "$DATA"
}

write_conf() {
    local port=$1 wal=$2 conf=$DATA/wallaby.conf
    cat >"$conf" <<EOF
# Generated by e2e/pg.sh on every start; do not edit.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$RUN_DIR'
wal_level = $wal
max_replication_slots = 64
max_wal_senders = 64
max_connections = 200
fsync = on
shared_buffers = 128MB
logging_collector = off
log_min_messages = warning
wal_sender_timeout = 60s
max_wal_size = 2GB
password_encryption = 'scram-sha-256'
# Stream transactions above 64kB before they commit (pgoutput v2), so every
# test and demo exercises the worker's spill path.
logical_decoding_work_mem = 64kB
EOF
    chmod 600 "$conf"
    give_to_pg "$conf"
}

super_psql() {
    PGHOST=$RUN_DIR PGPORT=$(current_port) PGUSER=$SUPER_USER PGDATABASE=postgres \
        "$PG_BIN/psql" -X "$@"
}

bootstrap_roles() {
    super_psql -q -v ON_ERROR_STOP=1 >&2 <<EOF
SET password_encryption = 'scram-sha-256';
ALTER ROLE $SUPER_USER PASSWORD '$SUPER_PASS';
SELECT 'CREATE ROLE $APP_USER' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$APP_USER') \gexec
ALTER ROLE $APP_USER WITH LOGIN REPLICATION CREATEDB PASSWORD '$APP_PASS';
SELECT 'CREATE DATABASE $APP_DB OWNER $APP_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$APP_DB') \gexec
ALTER DATABASE $APP_DB OWNER TO $APP_USER;
EOF
}

# Start the server with no inherited file descriptors beyond 0-2: a leaked
# pipe (e.g. from a test harness) or our lock fd would otherwise be held open
# by the long-running postmaster.
spawn_server() {
    (
        local fd n
        for fd in /proc/"$BASHPID"/fd/*; do
            n=${fd##*/}
            if [[ $n =~ ^[0-9]+$ ]] && ((n > 2)); then eval "exec $n>&-"; fi
        done
        as_pg "$PG_BIN/pg_ctl" -D "$DATA" -w -t 60 -l "$LOGFILE" start >&2
    )
}

# --------------------------------------------------------------- commands ---

cmd_start() {
    ensure_installed
    ensure_pg_os_user
    resolve_state
    [[ -z $FALLBACK_NOTE ]] || log "$FALLBACK_NOTE"
    prepare_state_dir
    take_lock

    if running; then
        local p
        p=$(current_port)
        if [[ -n ${WALLABY_PG_PORT:-} && $WALLABY_PG_PORT != "$p" ]]; then
            log "warning: already running on port $p (WALLABY_PG_PORT=$WALLABY_PG_PORT ignored; stop first)"
        fi
        log "already running (dir $STATE, port $p)"
        app_dsn "$p"
        return 0
    fi

    initialized || do_initdb

    local port wal sock attempt
    wal=$(choose_wal_level)
    # The chosen port can be taken between the check and the bind (another instance
    # starting, or an outgoing connection that drew it from the ephemeral range):
    # try the next free port a few times before giving up.
    for attempt in 1 2 3 4 5; do
        port=$(choose_port)
        sock="$RUN_DIR/.s.PGSQL.$port"
        ((${#sock} <= 107)) || die "unix socket path too long (${#sock} > 107): $sock; set WALLABY_PG_DIR to a shorter path"
        printf '%s\n' "$port" >"$PORT_FILE"
        printf '%s\n' "$wal" >"$WAL_FILE"
        write_conf "$port" "$wal"

        if is_root && [[ ! -e $LOGFILE ]]; then : >"$LOGFILE"; fi
        give_to_pg "$PORT_FILE" "$WAL_FILE" "$RUN_DIR"
        if [[ -e $LOGFILE ]]; then give_to_pg "$LOGFILE"; fi

        log "starting PostgreSQL 15 (dir $STATE, port $port, wal_level $wal)"
        if spawn_server; then
            break
        fi
        if [[ -z ${WALLABY_PG_PORT:-} && $attempt -lt 5 ]] &&
            tail -n 20 -- "$LOGFILE" 2>/dev/null | grep -q "could not create any TCP/IP sockets"; then
            log "port $port was taken while starting; trying another"
            SKIP_PORTS+=("$port")
            continue
        fi
        log "pg_ctl start failed; last lines of $LOGFILE:"
        tail -n 40 -- "$LOGFILE" >&2 || true
        exit 1
    done
    if ! bootstrap_roles; then
        log "role/database bootstrap failed; last lines of $LOGFILE:"
        tail -n 20 -- "$LOGFILE" >&2 || true
        exit 1
    fi
    app_dsn "$port"
}

cmd_stop() {
    resolve_state
    if ! running; then
        log "not running (dir $STATE)"
        return 0
    fi
    take_lock
    if running; then
        as_pg "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >&2 9>&- || die "pg_ctl stop failed"
    fi
}

cmd_status() {
    resolve_state
    if ! initialized; then
        printf 'not initialized (dir %s)\n' "$STATE"
        return 3
    fi
    if running; then
        local p pid
        p=$(current_port)
        pid=$(head -n1 "$DATA/postmaster.pid" 2>/dev/null || true)
        printf 'running (pid %s, port %s, wal_level %s, dir %s)\n' "$pid" "$p" "$(choose_wal_level)" "$STATE"
        app_dsn "$p"
        return 0
    fi
    printf 'stopped (dir %s)\n' "$STATE"
    return 3
}

cmd_dsn() {
    resolve_state
    require_running
    app_dsn "$(current_port)"
}

cmd_env() {
    resolve_state
    require_running
    local p
    p=$(current_port)
    printf 'export WALLABY_PG_DIR=%q WALLABY_PG_PORT=%q WALLABY_PG_DSN=%q WALLABY_PG_SUPERUSER_DSN=%q PGHOST=127.0.0.1 PGPORT=%q\n' \
        "$STATE" "$p" "$(app_dsn "$p")" "$(super_dsn "$p")" "$p"
}

cmd_psql() {
    resolve_state
    require_running
    local p
    p=$(current_port)
    PGHOST=$RUN_DIR PGPORT=$p PGUSER=$SUPER_USER PGDATABASE=postgres exec "$PG_BIN/psql" "$@"
}

cmd_destroy() {
    resolve_state
    if [[ ! -e $STATE ]]; then
        log "nothing to destroy ($STATE does not exist)"
        return 0
    fi
    [[ -e $STATE/$MARKER || -z $(ls -A -- "$STATE") ]] ||
        die "$STATE was not created by pg.sh (no $MARKER); refusing to delete it"
    cmd_stop
    rm -rf -- "$STATE"
    log "removed $STATE"
}

usage() {
    sed -n '2,/^set -euo/p' "$SCRIPT_PATH" | sed '$d; s/^# \{0,1\}//' >&2
}

main() {
    local cmd=${1:-start}
    (($# == 0)) || shift
    case $cmd in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    dsn) cmd_dsn ;;
    env) cmd_env ;;
    psql) cmd_psql "$@" ;;
    destroy) cmd_destroy ;;
    -h | --help | help) usage ;;
    *) usage; die "unknown command: $cmd" ;;
    esac
}

main "$@"
