#!/bin/sh
# Fitflow: the tweet sink on 127.0.0.1:18721, opsloop's HTTP on 127.0.0.1:18720, and an
# OPS_KEY for /api/* (made once and kept in .ops_key here, mode 0600, unless set).
. "$(dirname "$0")/../common.sh"
OPSLOOP_HTTP_ADDR=${OPSLOOP_HTTP_ADDR:-127.0.0.1:18720}
export OPSLOOP_HTTP_ADDR
ops_key
sink 18721
run_opsloop
