#!/usr/bin/env bash
# Build the opsloop Debian package with cargo-deb (metadata in Cargo.toml).
#
#   deploy/deb.sh [cargo-deb flags...]        e.g. --deb-revision 2, --output DIR, --fast
#
# Builds the release binary (cargo build --release --locked), generates the shell
# completions and man pages with it (`opsloop completions SHELL`, `opsloop manpage --dir`) into
# target/release/deb/, then runs `cargo deb --no-build`. Prints the .deb's path last.
#
# OPSLOOP_BIN=path/to/opsloop packages that binary instead of building one (CI packages
# the debug binary its tests built): it is staged with its generated files in a scratch
# target dir, so a real target/release is never touched.
# cargo-deb is installed first if missing (cargo install cargo-deb --locked, pinned).
set -euo pipefail

CARGO_DEB_VERSION=3.8.0
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if ! cargo deb --version >/dev/null 2>&1; then
  echo "deb.sh: installing cargo-deb $CARGO_DEB_VERSION (once)" >&2
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi

if [ -n "${OPSLOOP_BIN:-}" ]; then
  [ -x "$OPSLOOP_BIN" ] || { echo "deb.sh: OPSLOOP_BIN=$OPSLOOP_BIN is not an executable" >&2; exit 2; }
  target=$(mktemp -d "${TMPDIR:-/tmp}/opsloop-deb.XXXXXX")
  trap 'rm -rf "$target"' EXIT
  mkdir -p "$target/release"
  cp "$OPSLOOP_BIN" "$target/release/opsloop"
  export CARGO_TARGET_DIR=$target
else
  cargo build --release --locked >&2
  target=$(cargo metadata --format-version 1 --no-deps |
    grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
fi

bin="$target/release/opsloop"
gen="$target/release/deb"
rm -rf "$gen"
mkdir -p "$gen/man"
"$bin" completions bash >"$gen/opsloop.bash"
"$bin" completions zsh >"$gen/_opsloop"
"$bin" completions fish >"$gen/opsloop.fish"
"$bin" manpage --dir "$gen/man" >&2
gzip -9n "$gen"/man/*.1    # Debian policy; cargo-deb compresses only files it did not build

flags=(--no-build --locked)
# The scratch dir goes away at exit: unless told otherwise, the package goes to target/debian.
if [ -n "${OPSLOOP_BIN:-}" ] && [[ " $* " != *" --output"* ]] && [[ " $* " != *" -o "* ]]; then
  mkdir -p "$root/target/debian"
  flags+=(--output "$root/target/debian/")
fi
cargo deb "${flags[@]}" "$@" | tail -n1
