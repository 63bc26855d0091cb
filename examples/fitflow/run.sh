#!/bin/sh
# Fitflow: the tweet sink on 127.0.0.1:18721, opsloop's HTTP on 127.0.0.1:18720, and an
# OPS_KEY for /api/* (made once and kept in .ops_key here, mode 0600, unless set).
. "$(dirname "$0")/../common.sh"
OPSLOOP_HTTP_ADDR=${OPSLOOP_HTTP_ADDR:-127.0.0.1:18720}
if [ -z "${OPS_KEY:-}" ]; then
    if [ ! -s .ops_key ]; then
        (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > .ops_key)
    fi
    OPS_KEY=$(cat .ops_key)
    echo "fitflow: OPS_KEY is in $here/.ops_key" >&2
fi
export OPSLOOP_HTTP_ADDR OPS_KEY
sink 18721
run_opsloop
