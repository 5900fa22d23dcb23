#!/usr/bin/env bash
# npm run test:system: builds the .debs (npm run package), then boots them in a fresh Debian 12 root
# under systemd (test/system/package.test.ts). Needs root, debootstrap, systemd-container,
# dpkg-repack, swtpm; fails (never skips) when something is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
npm run package
exec npx vitest run --config test/system/vitest.config.ts "$@"
