#!/usr/bin/env bash
# Install the cluster extra (Ray Serve, pinned) into .venv after checking it changes nothing svda
# pins: torch, transformers, grpcio, protobuf must stay as they are (docs/cluster.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP="${PIP:-.venv/bin/pip}"
SPEC="ray[serve]==2.60.0"
plan="$("$PIP" install --dry-run "$SPEC" 2>&1 | grep '^Would install' || true)"
echo "${plan:-nothing to install}"
if grep -qiE '(^| )(torch|transformers|grpcio|protobuf)-[0-9]' <<<"$plan"; then
    echo "install-cluster: $SPEC would change torch/transformers/grpcio/protobuf; not installing." >&2
    echo "Resolve the pin conflict first (see docs/cluster.md)." >&2
    exit 1
fi
"$PIP" install "$SPEC"
.venv/bin/python -c "import ray, ray.serve; print('ray', ray.__version__)"
