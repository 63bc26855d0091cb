#!/usr/bin/env bash
# The daemon's footprint (issue 6): how soon `opsloop run` answers /healthz on a migrated
# database, its resident memory when idle, and the peak resident memory of a
# 20,000-step `bench worker` (the same worker code, in one process).
#
# usage: benches/daemon.sh        (needs a release build: cargo build --release)
#
# environment (optional):
#   PG_URL  server to use; a scratch database is created and dropped
#           (default: postgres://postgres@127.0.0.1:5432/postgres)
#   PORT    HTTP port for the daemon (default 18080)
#
# stdout: one JSON line {"bench":"daemon","healthz_after_start_ms":..,"rss_idle_mb":..,
#         "rss_peak_bench_worker_mb":..}
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPSLOOP="$ROOT/target/release/opsloop"
PG_URL="${PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
PORT="${PORT:-18080}"
DB="opsloop_daemon_bench_$$"

die() { printf 'daemon.sh: error: %s\n' "$*" >&2; exit 1; }
[[ -x "$OPSLOOP" ]] || die "$OPSLOOP not found: run cargo build --release first"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "PORT must be a number"
command -v curl >/dev/null || die "'curl' is required"
command -v psql >/dev/null || die "'psql' is required"

URL="$(python3 -c 'import sys,urllib.parse as u; p=u.urlsplit(sys.argv[1]); print(u.urlunsplit((p.scheme,p.netloc,"/"+sys.argv[2],p.query,p.fragment)))' "$PG_URL" "$DB")"
DAEMON=""
cleanup() {
  [[ -n "$DAEMON" ]] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true
  psql "$PG_URL" -qAt -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

psql "$PG_URL" -qAt -c "CREATE DATABASE \"$DB\"" >/dev/null
DATABASE_URL="$URL" "$OPSLOOP" migrate >/dev/null

# Start on the migrated database and poll /healthz every millisecond.
export DATABASE_URL="$URL" OPSLOOP_HTTP_ADDR="127.0.0.1:$PORT" TELEGRAM_BOT_TOKEN=""
start_ns=$(date +%s%N)
"$OPSLOOP" run --policy "$ROOT/deploy/opsloop.example.toml" >/dev/null 2>&1 &
DAEMON=$!
healthz_ms=""
for _ in $(seq 1 5000); do
  if curl -fsS -o /dev/null "http://127.0.0.1:$PORT/healthz" 2>/dev/null; then
    healthz_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
    break
  fi
  kill -0 "$DAEMON" 2>/dev/null || die "opsloop run exited early"
  sleep 0.001
done
[[ -n "$healthz_ms" ]] || die "no /healthz answer within 5 s"

sleep 5
rss_idle_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$DAEMON/status")
kill "$DAEMON"; wait "$DAEMON" 2>/dev/null || true; DAEMON=""

peak_kb=$( { /usr/bin/time -f '%M' "$OPSLOOP" bench worker --steps 20000 --workers 16 >/dev/null; } 2>&1 | tail -n1 )
[[ "$peak_kb" =~ ^[0-9]+$ ]] || die "could not measure the bench's peak RSS (is /usr/bin/time installed?)"

python3 -c 'import json,sys; print(json.dumps({"bench":"daemon","healthz_after_start_ms":int(sys.argv[1]),"rss_idle_mb":round(int(sys.argv[2])/1024,1),"rss_peak_bench_worker_mb":round(int(sys.argv[3])/1024,1)}))' \
  "$healthz_ms" "$rss_idle_kb" "$peak_kb"
