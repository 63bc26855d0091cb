#!/bin/sh
# AgentVine: opsloop's HTTP on 127.0.0.1:18750; once it is up, one key per agent (made
# once, kept in .keys/NAME, mode 0600), each scoped to its own templates. The API needs
# an OPS_KEY too (the operator's, kept in .ops_key); the agents never see it.
. "$(dirname "$0")/../common.sh"
OPSLOOP_HTTP_ADDR=${OPSLOOP_HTTP_ADDR:-127.0.0.1:18750}
export OPSLOOP_HTTP_ADDR
ops_key
make_keys() {
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
