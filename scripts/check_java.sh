#!/usr/bin/env bash
# TorchServe's frontend needs Java 17 or newer on the PATH.
set -eu
if ! command -v java >/dev/null 2>&1; then
  echo "error: java not found. TorchServe needs Java >= 17: e.g. 'sudo apt-get install openjdk-17-jre-headless' (Debian/Ubuntu) or 'brew install openjdk@17' (macOS)." >&2
  exit 1
fi
version=$(java -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
major=${version%%.*}
[ "$major" = "1" ] && major=$(echo "$version" | cut -d. -f2)
if [ "${major:-0}" -lt 17 ] 2>/dev/null; then
  echo "error: java $version found; TorchServe needs Java >= 17: e.g. 'sudo apt-get install openjdk-17-jre-headless'." >&2
  exit 1
fi
echo "java $version OK"
