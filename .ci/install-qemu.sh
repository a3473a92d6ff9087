#!/usr/bin/env bash
# Installs qemu-system-x86 from bookworm-backports (matching the preinstalled
# qemu-img); plain bookworm's would remove qemu-utils. The backports entry is
# derived from the machine's own Debian sources, never hard-coded.
set -euo pipefail
command -v qemu-system-x86_64 >/dev/null && exit 0
src=/etc/apt/sources.list.d/debian.sources
bp=/etc/apt/sources.list.d/snapvmm-backports.sources
if [ ! -f "$bp" ]; then
  awk 'BEGIN{RS="";ORS="\n\n"} /Suites:[^\n]*bookworm([ \n]|$)/ && !/security/ {print; exit}' "$src" \
    | sed -E 's/^Suites:.*/Suites: bookworm-backports/' > "$bp"
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null
