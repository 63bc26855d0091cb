#!/usr/bin/env bash
# Validate the deploy kit: systemd units, compose file, Dockerfile, env example, the
# Grafana dashboard and Prometheus files, and the Debian package's whole life.
# One line per check; exits 1 if any check fails.
#
#   deploy/check.sh
#
# Needs systemd-analyze, man and groff, python3 with PyYAML. When they are missing they
# are installed (apt-get install systemd man-db groff-base / pip install pyyaml) only if
# running as root and CI or OPSLOOP_CHECK_INSTALL=1 is set; otherwise the check fails
# and says why.
# OPSLOOP_BIN=path/to/opsloop also checks the flags the units rely on (default: the
# first of target/release/opsloop, target/debug/opsloop that exists; none: skipped).
# With that binary, as root with CI or OPSLOOP_CHECK_INSTALL=1, the .deb is built from it
# (deploy/deb.sh, which installs cargo-deb if missing), installed with dpkg -i, checked
# (user, files, modes, conffiles, units, completions, man page), upgraded over itself
# with edited conffiles, removed and purged. It is skipped when opsloop is already on the
# machine (a package, /etc/opsloop, /var/lib/opsloop or /usr/bin/opsloop), and the
# package is purged at exit whatever happens.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
failed=0
tmp=$(mktemp -d)
deb_installed=0   # set while the lifecycle check below has opsloop installed
created_user=0    # set when that check created the opsloop user (removed again at exit)
# shellcheck disable=SC2329  # run by the trap
cleanup() {
  if [ "$deb_installed" = 1 ]; then dpkg --purge opsloop >/dev/null 2>&1 || true; fi
  if [ "$created_user" = 1 ]; then
    userdel opsloop >/dev/null 2>&1 || true
    groupdel opsloop >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

ok()   { printf 'ok    %s\n' "$1"; }
fail() { printf 'FAIL  %s: %s\n' "$1" "$2"; failed=1; }
skip() { printf 'skip  %s: %s\n' "$1" "$2"; }
may_install() { [ "$(id -u)" = 0 ] && { [ -n "${CI:-}" ] || [ "${OPSLOOP_CHECK_INSTALL:-}" = 1 ]; }; }

# ---- tools ------------------------------------------------------------------
need=()
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v man >/dev/null 2>&1 || need+=(man-db)
command -v groff >/dev/null 2>&1 || need+=(groff-base)
if [ ${#need[@]} -gt 0 ] && may_install; then
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"; } \
    >"$tmp/apt.log" 2>&1 || { echo "apt-get install ${need[*]} failed:"; tail -5 "$tmp/apt.log"; }
fi
if ! python3 -c 'import yaml' >/dev/null 2>&1 && may_install; then
  python3 -m pip install --quiet pyyaml >"$tmp/pip.log" 2>&1 || { echo "pip install pyyaml failed:"; tail -5 "$tmp/pip.log"; }
fi

# ---- systemd units ----------------------------------------------------------
# `systemd-analyze verify` fails when ExecStart's binary does not exist, and
# /usr/bin/opsloop is not installed on a build box (the .deb's installed units are
# verified as they are, below). So each unit is verified
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
  sed "s#/usr/bin/opsloop#$dir/opsloop#g" "$src" >"$dir/$as"
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
  'ExecStart=/usr/bin/opsloop run --policy /etc/opsloop/policy.toml' \
  'After=network-online.target postgresql.service'
require_lines "opsloop-worker@.service directives" "$here/opsloop-worker@.service" "${hardening[@]}" \
  'ExecStart=/usr/bin/opsloop worker --concurrency %i'

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

# ---- Grafana dashboard and Prometheus files ---------------------------------
# (That every metric they name is one opsloop exports is tested against a live
# /metrics in tests/metrics.rs.)
if out=$(python3 - "$here/grafana/opsloop.json" 2>&1 <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
assert d["uid"] == "opsloop" and len(exprs) >= 15, f"{len(exprs)} queries"
assert all("opsloop_" in e for e in exprs), "a query names no opsloop metric"
PY
); then ok "grafana/opsloop.json is a dashboard"; else fail "grafana/opsloop.json is a dashboard" "$(printf '%s' "$out" | tail -1)"; fi
for f in prometheus/prometheus.yml prometheus/opsloop.rules.yml; do
  if out=$(python3 -c 'import yaml,sys; yaml.safe_load(open(sys.argv[1]))' "$here/$f" 2>&1); then
    ok "$f is YAML"
  else
    fail "$f is YAML" "$(printf '%s' "$out" | tail -1)"
  fi
done
if command -v promtool >/dev/null 2>&1; then
  if out=$(promtool check rules "$here/prometheus/opsloop.rules.yml" 2>&1); then ok "promtool check rules"; else fail "promtool check rules" "$(printf '%s' "$out" | tr '\n' ' ')"; fi
fi

# ---- the Debian package: build, install, upgrade, remove, purge -------------
# Checks as Debian users expect them: dpkg -i creates the user and the state directory,
# installs the config readable by the opsloop group only, enables and starts nothing;
# an upgrade keeps edited conffiles; remove keeps /etc/opsloop, /var/lib/opsloop and the
# user; purge deletes /etc/opsloop and /var/lib/opsloop and keeps the user.
want() { # name command... (ok when it succeeds)
  local name=$1; shift
  if out=$("$@" 2>&1); then ok "$name"; else fail "$name" "$(printf '%s' "${out:-failed}" | tail -3 | tr '\n' ' ')"; fi
}
modes() { # expected "mode user group" path...; one line for all
  local name=$1 expect=$2 bad=() p got; shift 2
  for p in "$@"; do
    got=$(stat -c '%a %U %G' "$p" 2>/dev/null || echo missing)
    [ "$got" = "$expect" ] || bad+=("$p is $got")
  done
  if [ ${#bad[@]} -eq 0 ]; then ok "$name"; else fail "$name" "want $expect: ${bad[*]}"; fi
}
gone() { # name path...
  local name=$1 left=() p; shift
  for p in "$@"; do [ -e "$p" ] && left+=("$p"); done
  if [ ${#left[@]} -eq 0 ]; then ok "$name"; else fail "$name" "still there: ${left[*]}"; fi
}
verify_installed() { # name unit-file [instance-name]
  local name=$1 unit=$2 as=${3:-} dir="$tmp/installed" out
  mkdir -p "$dir"
  if [ -n "$as" ]; then cp "$unit" "$dir/$as"; unit="$dir/$as"; fi
  if out=$(cd "$dir" && SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no "$unit" 2>&1) && [ -z "$out" ]; then
    ok "$name"
  else
    fail "$name" "$(printf '%s' "${out:-non-zero exit}" | tr '\n' ' ')"
  fi
}
pkg_status() { dpkg-query -W -f='${Status}' opsloop 2>/dev/null || true; }
pkg_present() { local s; s=$(pkg_status); [ -n "$s" ] && [ "${s##* }" != not-installed ]; }

deb_lifecycle() {
  local deb1 deb2 started conf=/etc/opsloop units=/lib/systemd/system
  local files=(/usr/bin/opsloop "$units/opsloop.service" "$units/opsloop-worker@.service"
    /usr/share/bash-completion/completions/opsloop /usr/share/zsh/vendor-completions/_opsloop
    /usr/share/fish/vendor_completions.d/opsloop.fish /usr/share/man/man1/opsloop.1.gz /usr/share/man/man1/opsloop-propose.1.gz)
  started=$(date +%s)
  mkdir -p "$tmp/deb1" "$tmp/deb2"
  if ! deb1=$(OPSLOOP_BIN=$bin bash "$here/deb.sh" --fast --output "$tmp/deb1/" 2>"$tmp/deb.log") || [ ! -f "$deb1" ]; then
    fail "deb: build (deploy/deb.sh)" "$(tail -3 "$tmp/deb.log" | tr '\n' ' ')"; return
  fi
  deb2=$(OPSLOOP_BIN=$bin bash "$here/deb.sh" --fast --deb-revision 2 --output "$tmp/deb2/" 2>>"$tmp/deb.log") || true
  ok "deb: build $(basename "$deb1") ($(du -k "$deb1" | cut -f1) KiB, $(($(date +%s) - started)) s with both)"
  want "deb: control (Depends, conffiles, scripts)" sh -c "
    dpkg-deb -f '$deb1' Depends | grep -q passwd &&
    dpkg-deb -e '$deb1' '$tmp/control' && grep -qx /etc/opsloop/opsloop.env '$tmp/control/conffiles' &&
    grep -qx /etc/opsloop/policy.toml '$tmp/control/conffiles' &&
    test -x '$tmp/control/postinst' -a -x '$tmp/control/prerm' -a -x '$tmp/control/postrm' &&
    ! grep -v '^ *echo' '$tmp/control/postinst' | grep -Eq 'systemctl (enable|start|restart)'"

  getent passwd opsloop >/dev/null || created_user=1
  deb_installed=1
  want "deb: dpkg -i" dpkg -i "$deb1"
  local pw; pw=$(getent passwd opsloop || true)
  IFS=: read -r _ _ uid gid _ home shell <<<"$pw"
  if [ -n "$pw" ] && [ "$uid" -lt 1000 ] && [ "$home" = /var/lib/opsloop ] && [ "$shell" = /usr/sbin/nologin ] &&
     [ "$(getent group opsloop | cut -d: -f3)" = "$gid" ]; then
    ok "deb: system user opsloop (uid $uid, home /var/lib/opsloop, nologin)"
  else
    fail "deb: system user opsloop" "got '${pw:-none}'"
  fi
  modes "deb: files 0644/0755 root" "644 root root" "${files[@]:1}"
  modes "deb: /usr/bin/opsloop 0755 root" "755 root root" /usr/bin/opsloop
  modes "deb: /etc/opsloop 0750 root:opsloop" "750 root opsloop" "$conf"
  modes "deb: config 0640 root:opsloop" "640 root opsloop" "$conf/opsloop.env" "$conf/policy.toml"
  modes "deb: /var/lib/opsloop 0750 opsloop" "750 opsloop opsloop" /var/lib/opsloop
  want "deb: config readable by the opsloop group only" sh -c "
    runuser -u opsloop -- test -r $conf/opsloop.env && ! runuser -u opsloop -- test -w $conf/policy.toml &&
    ! runuser -u nobody -- test -r $conf/opsloop.env"
  want "deb: opsloop policy check, as opsloop" runuser -u opsloop -- /usr/bin/opsloop policy check "$conf/policy.toml"
  gone "deb: nothing enabled" /etc/systemd/system/multi-user.target.wants/opsloop.service
  if command -v systemd-analyze >/dev/null 2>&1; then
    verify_installed "deb: systemd-analyze verify installed opsloop.service" "$units/opsloop.service"
    verify_installed "deb: systemd-analyze verify installed opsloop-worker@4" "$units/opsloop-worker@.service" opsloop-worker@4.service
  else
    fail "deb: systemd-analyze verify installed units" "systemd-analyze not found"
  fi
  want "deb: bash -n completions" bash -n /usr/share/bash-completion/completions/opsloop
  want "deb: completion loads" bash -c '. /usr/share/bash-completion/completions/opsloop && complete -p opsloop'
  for sh in zsh fish; do
    if command -v "$sh" >/dev/null 2>&1; then
      want "deb: $sh -n completions" "$sh" -n "$(printf '%s\n' "${files[@]}" | grep -m1 "$sh")"
    fi
  done
  if command -v man >/dev/null 2>&1; then
    # shellcheck disable=SC2016  # expanded by that sh
    want "deb: man -l renders every man page, no warnings" sh -c '
      n=0
      for page in /usr/share/man/man1/opsloop*.1.gz; do
        warn=$(MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null) && [ -z "$warn" ] || { echo "$page: $warn"; exit 1; }
        n=$((n + 1))
      done
      [ "$n" -gt 20 ] || { echo "only $n pages"; exit 1; }
      MANWIDTH=80 man -l /usr/share/man/man1/opsloop.1.gz | grep -q "propose(1)"'
  else
    fail "deb: man -l renders the man page" "man not found (apt-get install man-db groff-base)"
  fi

  # Upgrade over itself (revision 2) with both conffiles edited: the edits stay, quietly.
  echo "# edited by check.sh" >>"$conf/policy.toml"
  sed -i 's/^OPSLOOP_LOG=json$/OPSLOOP_LOG=pretty/' "$conf/opsloop.env"
  if [ -z "$deb2" ] || [ ! -f "$deb2" ]; then
    fail "deb: upgrade" "revision 2 was not built: $(tail -3 "$tmp/deb.log" | tr '\n' ' ')"
  else
    want "deb: dpkg -i revision 2 (upgrade)" sh -c "dpkg -i '$deb2' </dev/null"
    want "deb: upgraded to $(dpkg-deb -f "$deb2" Version)" test "$(dpkg-query -W -f='${Version}' opsloop)" = "$(dpkg-deb -f "$deb2" Version)"
    want "deb: edited conffiles kept" sh -c "
      tail -n1 $conf/policy.toml | grep -qx '# edited by check.sh' && grep -qx OPSLOOP_LOG=pretty $conf/opsloop.env &&
      ! ls $conf | grep -q dpkg-"
    modes "deb: config still 0640 root:opsloop" "640 root opsloop" "$conf/opsloop.env" "$conf/policy.toml"
    want "deb: same user after upgrade" test "$(id -u opsloop)" = "$uid"
  fi

  # apt remove: the program goes, configuration, state and user stay.
  echo "state" >/var/lib/opsloop/kept-by-remove
  want "deb: apt-get remove" env DEBIAN_FRONTEND=noninteractive apt-get remove -y opsloop
  gone "deb: remove deletes the program, units, completions, man page" "${files[@]}"
  want "deb: remove keeps /etc/opsloop (edited), /var/lib/opsloop, the user" sh -c "
    grep -qx '# edited by check.sh' $conf/policy.toml && test -f /var/lib/opsloop/kept-by-remove &&
    getent passwd opsloop >/dev/null"
  want "deb: status config-files" test "$(pkg_status)" = "deinstall ok config-files"

  # apt purge: configuration and state go; the system user stays, as Debian does.
  want "deb: apt-get purge" env DEBIAN_FRONTEND=noninteractive apt-get purge -y opsloop
  gone "deb: purge deletes /etc/opsloop and /var/lib/opsloop" "$conf" /var/lib/opsloop
  want "deb: purge drops the ownership overrides" sh -c "! dpkg-statoverride --list | grep -q ' /etc/opsloop'"
  if pkg_present; then fail "deb: not installed any more" "dpkg says: $(pkg_status)"; else ok "deb: not installed any more"; fi
  want "deb: purge keeps the opsloop user" getent passwd opsloop
  deb_installed=0
  ok "deb: lifecycle took $(($(date +%s) - started)) s"
}

if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  skip "deb lifecycle" "no opsloop binary (set OPSLOOP_BIN)"
elif ! may_install; then
  skip "deb lifecycle" "installs a package: run as root with CI=true or OPSLOOP_CHECK_INSTALL=1"
elif ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  skip "deb lifecycle" "not a Debian system (no dpkg/apt-get)"
elif pkg_present || [ -e /etc/opsloop ] || [ -e /var/lib/opsloop ] || [ -e /usr/bin/opsloop ]; then
  skip "deb lifecycle" "opsloop is already on this machine; not touching it"
else
  deb_lifecycle
fi

# ---- the scripts ------------------------------------------------------------
if command -v shellcheck >/dev/null 2>&1; then
  if out=$(shellcheck "$here/check.sh" "$here/deb.sh" "$here"/debian/* 2>&1); then ok "shellcheck check.sh deb.sh debian/*"; else fail "shellcheck" "$(printf '%s' "$out" | head -3 | tr '\n' ' ')"; fi
fi

exit "$failed"
