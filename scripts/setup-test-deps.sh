#!/usr/bin/env bash
# System packages the tests drive (not needed to run the swarm): Debian's chromium for the browser tests,
# iproute2 and iptables for the NAT lab. Needs root and apt-get; without them those tests are skipped, saying why.
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables >/dev/null || missing+=(iptables)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "Not installing ${missing[*]} (needs root and apt-get): the tests that use them will be skipped." >&2
  exit 0
fi
echo "Installing ${missing[*]} with apt-get..."
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
