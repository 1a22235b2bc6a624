#!/usr/bin/env bash
# Set everything up (Python >= 3.12, .venv, install) and start the proxy on config.example.yaml
# (or the config given with -c). Extra arguments go to metrion-proxy.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv
cd "$ROOT"
if [[ " $* " != *" -c "* && " $* " != *" --config "* ]]; then
  set -- -c "$ROOT/config.example.yaml" "$@"
fi
exec "$VENV/bin/metrion-proxy" "$@"
