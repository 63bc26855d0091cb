#!/bin/sh
# NeonHub: six cron agents; opsloop's HTTP on 127.0.0.1:18730.
. "$(dirname "$0")/../common.sh"
OPSLOOP_HTTP_ADDR=${OPSLOOP_HTTP_ADDR:-127.0.0.1:18730}
export OPSLOOP_HTTP_ADDR
run_opsloop
