#!/usr/bin/env bash
# Validate the deploy kit offline: systemd units, compose file, Dockerfile, env example.
# One line per check; exits 1 if any check fails.
#
#   deploy/check.sh
#
# Needs systemd-analyze and python3 with PyYAML. When they are missing they are
# installed (apt-get install systemd / pip install pyyaml) only if running as root
# and CI or OPSLOOP_CHECK_INSTALL=1 is set; otherwise the check fails and says why.
# OPSLOOP_BIN=path/to/opsloop also checks the flags the units rely on (default: the
# first of target/release/opsloop, target/debug/opsloop that exists; none: skipped).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ok()   { printf 'ok    %s\n' "$1"; }
fail() { printf 'FAIL  %s: %s\n' "$1" "$2"; failed=1; }
skip() { printf 'skip  %s: %s\n' "$1" "$2"; }
may_install() { [ "$(id -u)" = 0 ] && { [ -n "${CI:-}" ] || [ "${OPSLOOP_CHECK_INSTALL:-}" = 1 ]; }; }

# ---- tools ------------------------------------------------------------------
if ! command -v systemd-analyze >/dev/null 2>&1 && may_install; then
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd; } \
    >"$tmp/apt.log" 2>&1 || { echo "apt-get install systemd failed:"; tail -5 "$tmp/apt.log"; }
fi
if ! python3 -c 'import yaml' >/dev/null 2>&1 && may_install; then
  python3 -m pip install --quiet pyyaml >"$tmp/pip.log" 2>&1 || { echo "pip install pyyaml failed:"; tail -5 "$tmp/pip.log"; }
fi

# ---- systemd units ----------------------------------------------------------
# `systemd-analyze verify` fails when ExecStart's binary does not exist, and
# /usr/local/bin/opsloop is not installed on a build box. So each unit is verified
# as a copy in a temp dir whose ExecStart points at a stand-in executable (a copy of
# `true`); everything else is verified as written. verify reports unknown keys and
# bad values as warnings with exit status 0, so any output counts as a failure.
# The template is verified as the instance opsloop-worker@4.service. Each unit gets
# its own dir, so one unit's warnings are not reported again for another.
verify_unit() { # name source-file unit-file-name
  local name=$1 src=$2 as=$3 dir="$tmp/units-$3" out
  if ! command -v systemd-analyze >/dev/null 2>&1; then
    fail "$name" "systemd-analyze not found (apt-get install systemd, or rerun as root with OPSLOOP_CHECK_INSTALL=1)"
    return
  fi
  [ -f "$src" ] || { fail "$name" "$src missing"; return; }
  mkdir -p "$dir"
  [ -x "$dir/opsloop" ] || cp "$(type -P true)" "$dir/opsloop"
  sed "s#/usr/local/bin/opsloop#$dir/opsloop#g" "$src" >"$dir/$as"
  if out=$(cd "$dir" && SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no "./$as" 2>&1) && [ -z "$out" ]; then
    ok "$name"
  else
    fail "$name" "$(printf '%s' "${out:-non-zero exit}" | tr '\n' ' ')"
  fi
}
verify_unit "systemd-analyze verify opsloop.service" "$here/opsloop.service" opsloop.service
verify_unit "systemd-analyze verify opsloop-worker@.service" "$here/opsloop-worker@.service" opsloop-worker@4.service

# Directives the kit promises (a reviewer dropping one should notice).
require_lines() { # name file line...
  local name=$1 file=$2 missing=() l; shift 2
  for l in "$@"; do grep -qxF -- "$l" "$file" 2>/dev/null || missing+=("$l"); done
  if [ ${#missing[@]} -eq 0 ]; then ok "$name"; else fail "$name" "missing: ${missing[*]}"; fi
}
hardening=(User=opsloop Group=opsloop WorkingDirectory=/var/lib/opsloop StateDirectory=opsloop
  EnvironmentFile=/etc/opsloop/opsloop.env Restart=on-failure RestartSec=5 TimeoutStopSec=45
  KillMode=mixed LimitNOFILE=65536 NoNewPrivileges=yes ProtectSystem=strict
  ReadWritePaths=/var/lib/opsloop ProtectHome=yes PrivateTmp=yes ProtectKernelTunables=yes
  ProtectKernelModules=yes ProtectControlGroups=yes RestrictSUIDSGID=yes LockPersonality=yes
  RestrictRealtime=yes RestrictNamespaces=yes CapabilityBoundingSet=
  Wants=network-online.target WantedBy=multi-user.target)
require_lines "opsloop.service directives" "$here/opsloop.service" "${hardening[@]}" \
  'ExecStart=/usr/local/bin/opsloop run --policy /etc/opsloop/policy.toml' \
  'After=network-online.target postgresql.service'
require_lines "opsloop-worker@.service directives" "$here/opsloop-worker@.service" "${hardening[@]}" \
  'ExecStart=/usr/local/bin/opsloop worker --concurrency %i'

# ---- compose.yaml -----------------------------------------------------------
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
  fail "compose.yaml is YAML" "python3 with PyYAML not found (pip install pyyaml, or rerun as root with OPSLOOP_CHECK_INSTALL=1)"
elif out=$(python3 -c 'import yaml,sys; yaml.safe_load(open(sys.argv[1]))' "$here/compose.yaml" 2>&1); then
  ok "compose.yaml is YAML"
  if out=$(cd "$here" && python3 - <<'PY' 2>&1
import os, yaml
c = yaml.safe_load(open("compose.yaml"))
s = c["services"]
pg, app = s["postgres"], s["opsloop"]
assert pg["image"].startswith("postgres:16"), "postgres image is not postgres:16"
assert "pg_isready" in " ".join(pg["healthcheck"]["test"]), "postgres healthcheck does not use pg_isready"
assert app["depends_on"]["postgres"]["condition"] == "service_healthy", "opsloop does not wait for a healthy postgres"
b = app["build"]
df = os.path.join(b["context"], b["dockerfile"])
assert os.path.isfile(df), f"build context + dockerfile = {df}: no such file"
assert app["env_file"] == "opsloop.env", "env_file is not opsloop.env"
assert "@postgres:5432/opsloop" in app["environment"]["DATABASE_URL"], "DATABASE_URL does not point at the postgres service"
for v in app["volumes"]:
    src = v.split(":")[0]
    assert not src.startswith(".") or os.path.exists(src), f"mounted file {src} does not exist"
assert any(v.endswith(":/etc/opsloop/policy.toml:ro") for v in app["volumes"]), "policy not mounted read-only"
cmd = app["command"]
assert cmd[:1] == ["run"] and "--policy" in cmd, "command is not run --policy ..."
assert all(p.startswith("127.0.0.1:") for p in app["ports"]), "a port is published beyond loopback"
PY
  ); then ok "compose.yaml services"; else fail "compose.yaml services" "$(printf '%s' "$out" | tail -1)"; fi
else
  fail "compose.yaml is YAML" "$(printf '%s' "$out" | tail -1)"
fi

# ---- Dockerfile (minimal lint; no Docker engine needed) ---------------------
df="$here/Dockerfile"
problems=()
grep -qE '^FROM[[:space:]]+rust:[^[:space:]]+[[:space:]]+AS[[:space:]]+builder$' "$df" || problems+=("no 'FROM rust:... AS builder'")
[ "$(grep -cE '^FROM[[:space:]]' "$df")" -ge 2 ] || problems+=("not multi-stage")
grep -qE '^FROM[[:space:]]+debian:bookworm-slim' "$df" || problems+=("runtime is not debian:bookworm-slim")
grep -qE 'cargo build --release --locked' "$df" || problems+=("no cargo build --release --locked")
grep -qE '^COPY[[:space:]]+migrations[[:space:]]' "$df" || problems+=("migrations/ not copied (sqlx::migrate! needs it)")
grep -qE '^COPY[[:space:]]+--from=builder[[:space:]]' "$df" || problems+=("binary not copied from builder")
grep -qE '^USER[[:space:]]+[^r]' "$df" || problems+=("no non-root USER")
grep -qxF 'ENTRYPOINT ["tini", "--", "opsloop"]' "$df" || problems+=("ENTRYPOINT is not tini -- opsloop")
grep -qxF 'CMD ["run"]' "$df" || problems+=("CMD is not [\"run\"]")
grep -qE '^EXPOSE[[:space:]]+8080$' "$df" || problems+=("no EXPOSE 8080")
# Every build-context path a COPY names must exist at the repository root.
while read -r src; do
  [ -e "$root/$src" ] || problems+=("COPY source $src missing at repo root")
done < <(grep -E '^COPY[[:space:]]' "$df" | grep -v -- '--from=' | awk '{for (i = 2; i < NF; i++) print $i}')
if [ ${#problems[@]} -eq 0 ]; then ok "Dockerfile lint"; else fail "Dockerfile lint" "$(IFS=';'; echo "${problems[*]}")"; fi
if command -v hadolint >/dev/null 2>&1; then
  if out=$(hadolint --failure-threshold error "$df" 2>&1); then ok "hadolint"; else fail "hadolint" "$(printf '%s' "$out" | tr '\n' ' ')"; fi
fi

# ---- opsloop.env.example ----------------------------------------------------
env="$here/opsloop.env.example"
missing=()
for v in DATABASE_URL OPSLOOP_DATA_DIR OPSLOOP_POLICY TELEGRAM_BOT_TOKEN TELEGRAM_API_URL \
         OPSLOOP_ADMINS OPS_KEY OPSLOOP_HTTP_ADDR OPSLOOP_LOG; do
  grep -qE "^$v=" "$env" || missing+=("$v")
done
bad=$(grep -nvE '^(#.*|[A-Z_][A-Z0-9_]*=[^"'\''#]*|)$' "$env" | head -3 | tr '\n' ' ')
if [ ${#missing[@]} -eq 0 ] && [ -z "$bad" ]; then
  ok "opsloop.env.example variables"
else
  fail "opsloop.env.example variables" "missing: ${missing[*]:-none}; bad lines: ${bad:-none}"
fi

# ---- the binary's flags (optional) ------------------------------------------
bin=${OPSLOOP_BIN:-}
if [ -z "$bin" ]; then
  for b in "$root/target/release/opsloop" "$root/target/debug/opsloop"; do
    [ -x "$b" ] && { bin=$b; break; }
  done
fi
if [ -n "$bin" ] && [ -x "$bin" ]; then
  problems=()
  "$bin" run --help 2>&1 | grep -q -- '--policy' || problems+=("run has no --policy")
  "$bin" worker --help 2>&1 | grep -q -- '--concurrency' || problems+=("worker has no --concurrency")
  for c in migrate doctor status; do
    "$bin" "$c" --help >/dev/null 2>&1 || problems+=("no '$c' command")
  done
  if [ ${#problems[@]} -eq 0 ]; then ok "binary flags ($bin)"; else fail "binary flags ($bin)" "$(IFS=';'; echo "${problems[*]}")"; fi
else
  skip "binary flags" "no opsloop binary (set OPSLOOP_BIN)"
fi

# ---- this script ------------------------------------------------------------
if command -v shellcheck >/dev/null 2>&1; then
  if out=$(shellcheck "$here/check.sh" 2>&1); then ok "shellcheck check.sh"; else fail "shellcheck check.sh" "$(printf '%s' "$out" | head -3 | tr '\n' ' ')"; fi
fi

exit "$failed"
