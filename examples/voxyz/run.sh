#!/bin/sh
# VoxYZ-style six roles: the publisher's sink on 127.0.0.1:18711, opsloop's HTTP on
# 127.0.0.1:18710 (the observer reads its /metrics there), then `opsloop run`.
. "$(dirname "$0")/../common.sh"
OPSLOOP_HTTP_ADDR=${OPSLOOP_HTTP_ADDR:-127.0.0.1:18710}
export OPSLOOP_HTTP_ADDR
sink 18711
run_opsloop
