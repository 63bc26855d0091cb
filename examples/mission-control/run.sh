#!/bin/sh
# Mission Control: opsloop's HTTP on 127.0.0.1:18740, and a second agent host (an
# `opsloop worker`) once the daemon is up, so `opsloop status` lists two workers.
. "$(dirname "$0")/../common.sh"
OPSLOOP_HTTP_ADDR=${OPSLOOP_HTTP_ADDR:-127.0.0.1:18740}
export OPSLOOP_HTTP_ADDR
background sh -c 'python3 ../wait_ready.py "$0" && exec "$OPSLOOP" worker --concurrency 2' "$OPSLOOP_HTTP_ADDR"
run_opsloop
