#!/usr/bin/env bash
# The README's first command: a complete standalone run of WALlaby on this machine.
#
#   1. e2e/setup.sh installs what is missing and starts the private PostgreSQL (e2e/pg.sh);
#   2. builds wallaby-worker (release);
#   3. (re)creates public.orders, dropping the demo's old slot, publication and output;
#   4. runs `wallaby-worker run -f examples/quickstart.yaml` in the background;
#   5. once the slot is active, commits inserts, an update, a logical message and a delete
#      in several transactions, and waits until every change is in the JSON-lines files;
#   6. stops the worker with SIGTERM (it flushes, confirms and exits 0) and prints the
#      records, the status file and the slot's confirmed_flush_lsn.
#
# Re-runnable: every run starts from an empty table, slot and output directory.
# Output: .wallaby/quickstart/{out/*.jsonl,status.json,worker.log}
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."

readonly SLOT=wallaby_quickstart
readonly PUBLICATION=wallaby_quickstart
readonly STATE_DIR=.wallaby/quickstart
readonly OUT_DIR=$STATE_DIR/out
readonly WORKER_LOG=$STATE_DIR/worker.log
readonly STATUS_FILE=$STATE_DIR/status.json
readonly DEADLINE_SECONDS=60

step() { printf '\n== %s\n' "$*"; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

worker_pid=""
on_exit() {
    local rc=$?
    if [[ -n $worker_pid ]] && kill -0 "$worker_pid" 2>/dev/null; then
        kill -TERM "$worker_pid" 2>/dev/null || true
        wait "$worker_pid" 2>/dev/null || true
    fi
    if ((rc != 0)) && [[ -f $WORKER_LOG ]]; then
        printf '\ndemo: failed; last lines of %s:\n' "$WORKER_LOG" >&2
        tail -n 40 "$WORKER_LOG" >&2 || true
    fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------- 1 ---
step "setup: dependencies and the private PostgreSQL (e2e/setup.sh)"
setup_out="$("$here/setup.sh")"
DSN="${setup_out##*$'\n'}"
[[ $DSN == postgres://* ]] || die "e2e/setup.sh did not print a DSN as its last line (got: $DSN)"
# setup.sh may just have installed Rust into ~/.cargo in its own process.
if ! command -v cargo >/dev/null && [[ -f $HOME/.cargo/env ]]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
echo "PostgreSQL: $(sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#' <<<"$DSN")"

psql_q() { psql "$DSN" -v ON_ERROR_STOP=1 -qAt -c "$1"; }

# ---------------------------------------------------------------------------- 2 ---
step "build: cargo build --release -p wallaby-worker"
cargo build --release --locked -p wallaby-worker
worker_bin="${CARGO_TARGET_DIR:-target}/release/wallaby-worker"
[[ -x $worker_bin ]] || die "$worker_bin not found after the build"

# ---------------------------------------------------------------------------- 3 ---
step "reset: slot $SLOT, publication $PUBLICATION, table public.orders, $STATE_DIR"
psql_q "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$SLOT' AND NOT active" >/dev/null
still_active="$(psql_q "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '$SLOT' AND active")"
[[ -z $still_active ]] ||
    die "slot $SLOT is in use by backend PID $still_active (another wallaby-worker is running); stop it first"
psql_q "DROP PUBLICATION IF EXISTS $PUBLICATION"
psql_q "DROP TABLE IF EXISTS public.orders"
psql_q "CREATE TABLE public.orders (
            id bigserial PRIMARY KEY,
            customer text NOT NULL,
            amount numeric(10,2),
            note text,
            meta jsonb)"
rm -rf -- "$STATE_DIR"
mkdir -p -- "$STATE_DIR"

# ---------------------------------------------------------------------------- 4 ---
step "start: wallaby-worker run -f examples/quickstart.yaml (log: $WORKER_LOG)"
WALLABY_SECRET_QUICKSTART_POSTGRES_DSN="$DSN" \
    "$worker_bin" run -f examples/quickstart.yaml >"$WORKER_LOG" 2>&1 &
worker_pid=$!

deadline=$((SECONDS + DEADLINE_SECONDS))
until [[ $(psql_q "SELECT active FROM pg_replication_slots WHERE slot_name = '$SLOT'") == t ]]; do
    kill -0 "$worker_pid" 2>/dev/null || die "wallaby-worker exited before the slot became active"
    ((SECONDS < deadline)) || die "slot $SLOT not active after ${DEADLINE_SECONDS}s"
    sleep 0.2
done
echo "slot $SLOT is active: the worker is streaming"

# ---------------------------------------------------------------------------- 5 ---
step "changes: 4 transactions on public.orders"
psql_q "INSERT INTO public.orders (customer, amount, meta) VALUES
            ('ada', 12.50, '{\"vip\": true}'),
            ('bob', 7.00, NULL),
            ('cy', 120.00, '{\"tags\": [\"wholesale\"]}')"
psql "$DSN" -v ON_ERROR_STOP=1 -qAt >/dev/null <<'SQL'
BEGIN;
UPDATE public.orders SET amount = 99.99, note = 'price corrected' WHERE customer = 'ada';
SELECT pg_logical_emit_message(true, 'quickstart', 'price of order 1 corrected');
COMMIT;
SQL
psql_q "DELETE FROM public.orders WHERE customer = 'bob'"
psql_q "INSERT INTO public.orders (customer, amount) VALUES ('dee', 3.20)"
# 3 inserts + (1 update + 1 message) + 1 delete + 1 insert: one line each.
expected=7
echo "committed; waiting for $expected records in $OUT_DIR"

count_lines() {
    local files=("$OUT_DIR"/*.jsonl)
    [[ -e ${files[0]} ]] || { echo 0; return; }
    # Each payload starts with a schema header line; count the changes and messages.
    cat -- "${files[@]}" | grep -vc '"wallaby_schema"' || true
}
deadline=$((SECONDS + DEADLINE_SECONDS))
while (($(count_lines) < expected)); do
    kill -0 "$worker_pid" 2>/dev/null || die "wallaby-worker exited while streaming"
    ((SECONDS < deadline)) || die "only $(count_lines) of $expected records after ${DEADLINE_SECONDS}s"
    sleep 0.2
done
got=$(count_lines)
((got == expected)) || die "expected $expected records, found $got"

step "records ($OUT_DIR)"
ls -l -- "$OUT_DIR"
while IFS= read -r line; do
    if command -v python3 >/dev/null; then
        python3 -m json.tool <<<"$line"
    else
        printf '%s\n' "$line"
    fi
done < <(cat -- "$OUT_DIR"/*.jsonl | grep -v '"wallaby_schema"')

# ---------------------------------------------------------------------------- 6 ---
step "stop: SIGTERM (flush, fsync, confirm, exit)"
kill -TERM "$worker_pid"
rc=0
wait "$worker_pid" || rc=$?
worker_pid=""
((rc == 0)) || die "wallaby-worker exited with code $rc"
echo "wallaby-worker exited with code 0"

step "status file ($STATUS_FILE)"
cat -- "$STATUS_FILE"
echo

step "slot $SLOT"
confirmed=$(psql_q "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '$SLOT'")
# commit_lsn is a number in the records (bytes since 0/0); the highest one is the last
# delivered commit.
last_lsn=$(cat -- "$OUT_DIR"/*.jsonl | grep -o '"commit_lsn":[0-9]*' | cut -d: -f2 | sort -n | tail -n 1)
last_lsn=$(psql_q "SELECT '0/0'::pg_lsn + $last_lsn")
echo "confirmed_flush_lsn: $confirmed (commit LSN of the last record: $last_lsn)"
[[ $(psql_q "SELECT pg_lsn '$confirmed' > pg_lsn '$last_lsn'") == t ]] ||
    die "the slot's confirmed_flush_lsn $confirmed is not past the last delivered commit $last_lsn"

step "done"
cat <<EOF
The worker streamed $expected changes into $OUT_DIR and confirmed them to slot $SLOT.
A restart resumes from confirmed_flush_lsn $confirmed:
  WALLABY_SECRET_QUICKSTART_POSTGRES_DSN=\$(e2e/pg.sh dsn) $worker_bin run -f examples/quickstart.yaml
EOF
