#!/usr/bin/env bash
# Peer comparison: `opsloop bench worker` vs graphile_worker (tuned and default) on the
# same PostgreSQL server, in the same run, at the same concurrency. See README.md.
#
# usage: benches/peer/run.sh [N]
#
# environment (all optional):
#   N            jobs/steps per case (default 20000; the first argument wins)
#   WORKERS      concurrency for both sides (default 16)
#   ROUNDS       how many times to run the pair; figures are the medians (default 1)
#   PG_URL       URL of the server to use, any existing database on it, used to
#                create/drop the scratch databases
#                (default: postgres://postgres@127.0.0.1:5432/postgres)
#   SKIP_BUILD=1 use the existing release binaries
#
# stdout: every bench's JSON line, then one line
#   {"bench":"peer_ratio","opsloop_steps_per_s":X,"peer_jobs_per_s":Y,"ratio":X/Y,...}
# using the peer's tuned figure. Progress and diagnostics go to stderr.
set -euo pipefail

N="${1:-${N:-20000}}"
WORKERS="${WORKERS:-16}"
ROUNDS="${ROUNDS:-1}"
PG_URL="${PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

PEER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$PEER_DIR/../.." && pwd)"
OPSLOOP="$ROOT/target/release/opsloop"
PEER="$PEER_DIR/target/release/peer-bench"

say() { printf 'run.sh: %s\n' "$*" >&2; }
die() { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }

for v in N WORKERS ROUNDS; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
for tool in cargo psql python3; do
  command -v "$tool" >/dev/null || die "'$tool' is required but not on PATH"
done

# URL of database $1 on the same server as PG_URL.
db_url() {
  python3 - "$PG_URL" "$1" <<'PY'
import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1])
print(u.urlunsplit((p.scheme, p.netloc, "/" + sys.argv[2], p.query, p.fragment)))
PY
}
psql_admin() { psql "$PG_URL" -v ON_ERROR_STOP=1 -qAt "$@"; }

psql_admin -c 'SELECT 1' >/dev/null 2>&1 || die "cannot connect to PG_URL=$PG_URL (is PostgreSQL running?)"

# Scratch databases: unique per run, always dropped on exit.
TAG="$(date +%s)_$$"
OPS_DB="opsloop_peer_bench_$TAG"
PEER_DB="graphile_peer_bench_$TAG"
OUT="$(mktemp -d)"
cleanup() {
  local rc=$?
  for db in "$OPS_DB" "$PEER_DB"; do
    psql_admin -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
      || psql_admin -c "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 \
      || say "warning: could not drop database $db; drop it by hand"
  done
  rm -rf "$OUT"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- build
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  say "building peer-bench (release) in $PEER_DIR"
  (cd "$PEER_DIR" && cargo build --release --quiet) || die "peer-bench build failed"
  say "building opsloop (release) in $ROOT"
  (cd "$ROOT" && cargo build --release --quiet) || die "opsloop build failed"
fi
[[ -x "$OPSLOOP" ]] || die "$OPSLOOP not found (build failed, or SKIP_BUILD=1 without a build)"
[[ -x "$PEER" ]] || die "$PEER not found (build failed, or SKIP_BUILD=1 without a build)"

# Prints the last line of file $1 that is a JSON object with "bench" == $2 (and, if
# $3 is given, "case" == $3 and "complete" true); fails if there is none.
json_line() {
  python3 - "$@" <<'PY'
import sys, json
case = sys.argv[3] if len(sys.argv) > 3 else None
line = None
for raw in open(sys.argv[1]):
    raw = raw.strip()
    if not raw.startswith("{"):
        continue
    try:
        d = json.loads(raw)
    except ValueError:
        continue
    if d.get("bench") == sys.argv[2] and (case is None or (d.get("case") == case and d.get("complete"))):
        line = raw
if line is None:
    sys.exit(1)
print(line)
PY
}

OPS_URL="$(db_url "$OPS_DB")"
PEER_URL="$(db_url "$PEER_DB")"
say "server: $(psql_admin -c 'SHOW server_version') at $(python3 -c 'import sys,urllib.parse as u; print(u.urlsplit(sys.argv[1]).hostname or "local socket")' "$PG_URL"); N=$N, concurrency=$WORKERS, rounds=$ROUNDS"

for round in $(seq 1 "$ROUNDS"); do
  # Fresh databases for every round.
  for db in "$OPS_DB" "$PEER_DB"; do
    psql_admin -c "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1
    psql_admin -c "CREATE DATABASE \"$db\"" >/dev/null
  done

  say "round $round/$ROUNDS: opsloop bench worker --steps $N --workers $WORKERS"
  if ! (cd "$ROOT" && DATABASE_URL="$OPS_URL" "$OPSLOOP" bench worker --steps "$N" --workers "$WORKERS") \
      >"$OUT/ops.$round" 2>"$OUT/ops.$round.err"; then
    cat "$OUT/ops.$round.err" >&2
    die "opsloop bench worker failed (output above)"
  fi
  json_line "$OUT/ops.$round" worker >"$OUT/ops.$round.json" \
    || { cat "$OUT/ops.$round" "$OUT/ops.$round.err" >&2; die "opsloop printed no {\"bench\":\"worker\",...} JSON line"; }
  cat "$OUT/ops.$round.json"

  say "round $round/$ROUNDS: peer-bench --jobs $N --concurrency $WORKERS (tuned, default)"
  if ! "$PEER" --jobs "$N" --concurrency "$WORKERS" --database-url "$PEER_URL" \
      >"$OUT/peer.$round" 2>"$OUT/peer.$round.err"; then
    cat "$OUT/peer.$round.err" >&2
    die "peer-bench failed (output above)"
  fi
  grep '^{' "$OUT/peer.$round" || true
  json_line "$OUT/peer.$round" peer_graphile_worker tuned >/dev/null \
    || { cat "$OUT/peer.$round.err" >&2; die "peer-bench printed no complete tuned JSON line"; }
done

# ---- ratio (medians over rounds)
python3 - "$OUT" "$ROUNDS" "$N" "$WORKERS" <<'PY'
import sys, json, statistics, os
out, rounds, n, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ops, peer_t, peer_d = [], [], []
for r in range(1, rounds + 1):
    o = json.load(open(os.path.join(out, f"ops.{r}.json")))
    if "steps_per_s" not in o:
        sys.exit("run.sh: error: opsloop's JSON line has no steps_per_s")
    ops.append(float(o["steps_per_s"]))
    for raw in open(os.path.join(out, f"peer.{r}")):
        try:
            d = json.loads(raw)
        except ValueError:
            continue
        if d.get("case") == "tuned":
            peer_t.append(float(d["jobs_per_s"]))
        elif d.get("case") == "default":
            peer_d.append(float(d["jobs_per_s"]))
x = statistics.median(ops)
y = statistics.median(peer_t)
print(json.dumps({
    "bench": "peer_ratio",
    "opsloop_steps_per_s": round(x, 2),
    "peer_jobs_per_s": round(y, 2),
    "ratio": round(x / y, 3),
    "peer_default_jobs_per_s": round(statistics.median(peer_d), 2) if peer_d else None,
    "n": n,
    "concurrency": workers,
    "rounds": rounds,
    "target_ratio": 1.0,
}, separators=(",", ":")))
PY
