#!/usr/bin/env bash
# The fault and load suite (docs/reliability.md): six faults against the real binaries on
# loopback, each with its load held, every request's ending counted, printed as a table.
#
#   scripts/chaos.sh                 # small scale (what CI runs), bench model
#   scripts/chaos.sh --full          # the issue's scale: c=32 streams, 1,000 disconnecting clients
#   scripts/chaos.sh --only kill,drain
#
# Builds the release binaries first (llmapi-launch, llmapi-router, llmapi-chaos); the chaos
# binary finds the others beside itself. Exit status: 0 when every scenario passed.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
exec target/release/llmapi-chaos "$@"
