#!/usr/bin/env bash
# Fill .gpu_carry/ (git-ignored) with what the rented GPU machine cannot fetch itself, then run there:
#   benchmarks/gpu_check.py        needs .gpu_carry/whl (torch-fidelity, for the Inception speed section)
#   benchmarks/gpu_convergence.py  needs .gpu_carry/fmnist (the Fashion-MNIST IDX files) and the wheel
# The machine has its own Python 3.12 + torch and no network, so the wheel is fetched for cp312 (pure Python:
# py3-none-any) and installed there with --no-index --no-deps into a PYTHONPATH directory:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/whl/*.whl
# Usage (from anywhere): bash benchmarks/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=.gpu_carry
mkdir -p "$CARRY/whl" "$CARRY/fmnist"

# (a) torch-fidelity, the FID Inception network's code (evaluations/inception.py imports it lazily).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d "$CARRY/whl" torch-fidelity==0.4.0

# (b) Fashion-MNIST from the Debian package setup.sh installs (preprocessing/images.py reads the .gz files as
# they are, from --data-path).
files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
for f in $files; do
    src=$(dpkg -L dataset-fashion-mnist 2>/dev/null | grep "/$f\$" | head -n 1 || true)
    if [ -z "$src" ] || [ ! -f "$src" ]; then
        echo "error: $f not found: apt-get install -y dataset-fashion-mnist (setup.sh does, as root)" >&2
        exit 1
    fi
    cp -f "$src" "$CARRY/fmnist/$f"
done

# Never committed: listed in this clone's own exclude file (not .gitignore, which travels with the repo).
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$CARRY/" "$exclude" 2>/dev/null || echo "/$CARRY/" >> "$exclude"

du -sh "$CARRY"/whl "$CARRY"/fmnist
ls -l "$CARRY"/whl "$CARRY"/fmnist
