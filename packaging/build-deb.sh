#!/bin/sh
# Builds target/debian/branchtftp_<version>_<arch>.deb: the release binary, the man page generated
# from the CLI (`branchtftp man`, clap_mangen) and cargo-deb's package around them.
# Usage: packaging/build-deb.sh [extra cargo-deb arguments]
set -eu
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb: installing cargo-deb" >&2
    cargo install cargo-deb --locked
fi

cargo build --release --locked
mkdir -p target/man
# -n: no name or timestamp in the gzip header, so the page is reproducible.
target/release/branchtftp man | gzip -9n > target/man/branchtftp.1.gz

# --strip: the release profile keeps line tables for backtraces; the package ships stripped.
cargo deb --no-build --locked --strip "$@"
