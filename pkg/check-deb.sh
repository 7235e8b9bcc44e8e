#!/usr/bin/env bash
# Checks the package pkg/deb.sh built: its contents, then a real install (dpkg -i) that
# puts blocksync on PATH with a working man page and bash completion, then removes it.
# Run as root on a machine where blocksync is not installed otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=target/blocksync.deb
fail() { echo "check-deb: $*" >&2; exit 1; }
contents=$(dpkg-deb --contents "$deb")
for path in ./usr/bin/blocksync ./usr/share/man/man1/blocksync.1.gz \
    ./usr/share/bash-completion/completions/blocksync \
    ./usr/share/zsh/vendor-completions/_blocksync \
    ./usr/share/fish/vendor_completions.d/blocksync.fish; do
    grep -q " $path\$" <<<"$contents" || fail "$deb lacks $path"
done
if dpkg -s blocksync >/dev/null 2>&1; then
    fail "a blocksync package is installed already; remove it first (dpkg -r blocksync)"
fi
trap 'dpkg -r blocksync >/dev/null 2>&1 || true' EXIT
dpkg -i "$deb" >/dev/null
[ "$(command -v blocksync)" = /usr/bin/blocksync ] || fail "blocksync is not on PATH after dpkg -i"
blocksync --version | grep -q '^blocksync ' || fail "the installed blocksync does not run"
MANPAGER=cat man blocksync 2>/dev/null | grep -q -- '--keep-versions' \
    || fail "man blocksync does not show the options"
words=$(bash -c 'source /usr/share/bash-completion/completions/blocksync
    COMP_WORDS=(blocksync --keep-v); COMP_CWORD=1; _blocksync blocksync --keep-v blocksync
    echo "${COMPREPLY[*]}"')
grep -q -- '--keep-versions' <<<"$words" || fail "bash completion of --keep-v gave: $words"
echo "check-deb: $deb installs blocksync, its man page and completions"
