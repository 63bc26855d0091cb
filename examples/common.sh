# Shared by examples/*/run.sh (sourced, not run): finds or builds opsloop, puts it on
# the agents' PATH (their scripts call `opsloop ask`), starts the example's helpers in
# the background and stops them with opsloop, whichever way it ends.
#
# Environment it honours: OPSLOOP (a built binary; default: `cargo build --release`
# here), DATABASE_URL (default: the embedded cluster in the example's .opsloop/), and
# every variable opsloop reads (a .env in the example's folder is read too). What the
# agents and the sink write goes to the example's out/ (steps run in the example's
# folder with a clean environment, so they find it as ./out).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ -z "${OPSLOOP:-}" ]; then
    target=${CARGO_TARGET_DIR:-$root/target}
    case $target in /*) ;; *) target=$root/$target ;; esac
    echo "building opsloop (cargo build --release) ..." >&2
    (cd "$root" && cargo build --release --quiet)
    OPSLOOP=$target/release/opsloop
fi
case $OPSLOOP in /*) ;; *) OPSLOOP=$(cd "$(dirname "$OPSLOOP")" && pwd)/$(basename "$OPSLOOP") ;; esac
PATH=$(dirname "$OPSLOOP"):$PATH
export PATH OPSLOOP
# The agents' scripts are found relative to the example's folder (steps run there).
cd "$here"
mkdir -p out

pids=""
stop_all() {
    trap - INT TERM EXIT
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill $pids 2>/dev/null || true
    wait 2>/dev/null || true
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap stop_all EXIT

# background COMMAND...: start a helper that lives as long as opsloop does.
background() {
    "$@" &
    pids="$pids $!"
}

# sink PORT: the local HTTP sink a publisher posts to (examples/sink.py).
sink() {
    background python3 "$root/examples/sink.py" "$1" "$here/out/posts.jsonl"
}

# ops_key: OPS_KEY (the operator's key for /api/*; the API is off without it), made
# once and kept in .ops_key here (mode 0600) unless it is set.
ops_key() {
    if [ -z "${OPS_KEY:-}" ]; then
        if [ ! -s .ops_key ]; then
            (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > .ops_key)
        fi
        OPS_KEY=$(cat .ops_key)
        echo "opsloop: OPS_KEY is in $here/.ops_key" >&2
    fi
    export OPS_KEY
}

# run_opsloop: the daemon on this example's policy, until it stops or is stopped.
run_opsloop() {
    echo "opsloop: $OPSLOOP run --policy $here/policy.toml (HTTP on $OPSLOOP_HTTP_ADDR)" >&2
    "$OPSLOOP" run --policy policy.toml &
    daemon=$!
    pids="$pids $daemon"
    status=0
    wait "$daemon" || status=$?
    exit "$status"
}
