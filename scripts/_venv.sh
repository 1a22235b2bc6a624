# Sourced by start.sh and test.sh: find a Python >= 3.12, create .venv, install the project (once per change).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

_py_ok() { "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  local c
  for c in "${METRION_PYTHON:-}" python3.14 python3.13 python3.12 python3 python; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && _py_ok "$c"; then command -v "$c"; return 0; fi
  done
  # Interpreters installed but not on PATH (pyenv, uv, deadsnakes, Homebrew).
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 \
           "$HOME"/.local/share/uv/python/cpython-3.1[2-9]*/bin/python3 \
           /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9] /opt/homebrew/bin/python3.1[2-9]; do
    if [ -x "$c" ] && _py_ok "$c"; then echo "$c"; return 0; fi
  done
  return 1
}

ensure_venv() {
  local extras="test" py stamp want  # one install for both commands: the test extras are small
  if [ ! -x "$VENV/bin/python" ] || ! _py_ok "$VENV/bin/python"; then
    if ! py="$(find_python)"; then
      cat >&2 <<'MSG'
metrion: no Python 3.12 or newer (with venv) found; mitmproxy 12 needs it.
Install one, then run this again, for example:
  pyenv install 3.12          (pyenv)
  uv python install 3.12      (uv)
  sudo apt install python3.12 python3.12-venv   (Debian/Ubuntu with a 3.12 package)
  brew install python@3.12    (macOS)
Or point to one: METRION_PYTHON=/path/to/python3.12 $0
MSG
      exit 1
    fi
    echo "metrion: creating .venv with $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))" >&2
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
  fi
  want="$(sha256sum < "$ROOT/pyproject.toml" | cut -c1-16)-${extras}"
  stamp="$VENV/.metrion-installed"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "metrion: installing into .venv${extras:+ (with $extras)}" >&2
    # pip's own chatter (and any build-backend notices) goes to a log, shown only if the install fails.
    local log="$VENV/install.log"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >"$log" 2>&1 || true
    if ! "$VENV/bin/python" -m pip install --quiet -e "$ROOT${extras:+[$extras]}" >>"$log" 2>&1; then
      cat "$log" >&2
      echo "metrion: install failed (log above, also in $log)" >&2
      exit 1
    fi
    echo "$want" > "$stamp"
  fi
}
