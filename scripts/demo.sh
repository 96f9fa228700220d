#!/usr/bin/env bash
# The README's main job: install the package, then run the whole demo
# (synthetic data -> ingest -> train PCAM and LSE -> evaluate -> export ->
# overlays) into demo_output/. About 7.5 minutes on 2 idle CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e .
exec python -m cxr_tf.demo --output_dir=demo_output "$@"
