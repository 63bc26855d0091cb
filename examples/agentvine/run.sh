#!/bin/sh
# AgentVine: opsloop's HTTP on 127.0.0.1:18750; once it is up, one key per agent (made
# once, kept in .keys/NAME, mode 0600), each scoped to its own templates. A build
# without agent keys gets one OPS_KEY instead (.ops_key), which every agent then shares.
. "$(dirname "$0")/../common.sh"
OPSLOOP_HTTP_ADDR=${OPSLOOP_HTTP_ADDR:-127.0.0.1:18750}
if [ -z "${OPS_KEY:-}" ]; then
    if [ ! -s .ops_key ]; then
        (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > .ops_key)
    fi
    OPS_KEY=$(cat .ops_key)
fi
export OPSLOOP_HTTP_ADDR OPS_KEY
make_keys() {
    "$OPSLOOP" keys --help >/dev/null 2>&1 || {
        echo "agentvine: this opsloop has no agent keys; the agents share OPS_KEY (.ops_key)" >&2
        return 0
    }
    python3 ../wait_ready.py "$OPSLOOP_HTTP_ADDR" || return 1
    (umask 077 && mkdir -p .keys)
    for spec in "triager --propose triage --read" "coder --propose fix --read" "releaser --propose release --read"; do
        name=${spec%% *}
        [ -s ".keys/$name" ] && continue
        # shellcheck disable=SC2086
        (umask 077 && "$OPSLOOP" keys create $spec > ".keys/$name.new" && mv ".keys/$name.new" ".keys/$name") \
            || { rm -f ".keys/$name.new"; echo "agentvine: could not create the key of $name" >&2; }
    done
    echo "agentvine: agent keys are in $here/.keys/" >&2
}
background make_keys
run_opsloop
