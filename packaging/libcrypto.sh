#!/usr/bin/env bash
# Builds a static libcrypto from a pinned OpenSSL release into PREFIX, for
# `MULTITUN_LIBCRYPTO=PREFIX pip install .` (setup.py) and the wheels
# (pyproject.toml, [tool.cibuildwheel]).
#
#     bash packaging/libcrypto.sh PREFIX [TARBALL]
#
# TARBALL is a local copy of the release (Debian's openssl_<version>.orig.tar.gz
# is the same file); without it the release is downloaded. Either way its SHA-256
# must match the one pinned here.
#
# Why: AES-GCM with VAES and VPCLMULQDQ (AVX-512) came in OpenSSL 3.1. On CPUs
# that have them it seals a 1400-byte packet 2.4 times faster than OpenSSL 3.0,
# which is what Debian 12, Ubuntu 24.04 and the wheel build images ship
# (README, "Speed"). Only the libraries are built: no apps, tests, docs,
# engines or loadable modules, and no shared library (setup.py keeps the copy's
# symbols private to the extension).
set -euo pipefail

VERSION=3.5.7  # OpenSSL 3.5 is a long-term support release (to April 2030).
SHA256=a8c0d28a529ca480f9f36cf5792e2cd21984552a3c8e4aa11a24aa31aeac98e8
URL=https://github.com/openssl/openssl/releases/download/openssl-$VERSION/openssl-$VERSION.tar.gz

prefix=${1:?usage: libcrypto.sh PREFIX [TARBALL]}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

tarball=${2:-$work/openssl.tar.gz}
[ -n "${2:-}" ] || curl -fsSL -o "$tarball" "$URL"
echo "$SHA256  $tarball" | sha256sum -c --quiet -

tar -xzf "$tarball" -C "$work" --strip-components=1
cd "$work"
log=$work/build.log
build() { "$@" >>"$log" 2>&1 || { tail -n 40 "$log"; exit 1; }; }
build ./Configure no-shared no-apps no-tests no-docs no-legacy no-engine no-module -fPIC \
    --prefix="$prefix" --libdir=lib
build make -j"$(nproc)" build_libs
build make install_dev
echo "libcrypto $VERSION in $prefix"
