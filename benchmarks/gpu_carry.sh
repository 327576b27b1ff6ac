#!/usr/bin/env bash
# Builds .gpu/, everything benchmarks/gpu_checklist.sh needs on an offline GPU machine, here
# (where the package registry is reachable), from the repository root:
#
#   benchmarks/gpu_carry.sh NAYER_CHECKOUT SHARED_DATA     # e.g. ~/src/NAYER ../shared/data
#
# .gpu/ is listed in .git/info/exclude (never committed) and travels with the device tool's
# `carry`. About 25 MB: wheels for Python 3.12 x86-64 (whl/, and whl_fallback/ with the
# flax/optax/orbax/chex versions this project is tested with, tried only if the machine's own fail
# to import), NAYER's code (git archive of the checkout, its images and ImageNet table left out),
# the akamaster resnet56 teacher converted to a bundle, and CIFAR-10's test split (9.5 MB of
# JPEGs). Delete .gpu/ when the lease is over: `rm -rf .gpu`.
set -euo pipefail
if (($# != 2)); then
  sed -n 2,12p "$0"; exit 2
fi
NAYER=$1
DATA=$2
[[ -f "$NAYER/datafree/synthesis/nayer.py" ]] || { echo "$NAYER is not a NAYER checkout" >&2; exit 2; }
[[ -d "$DATA/cifar10/test" ]] || { echo "$DATA has no cifar10/test split" >&2; exit 2; }
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >>.git/info/exclude
rm -rf .gpu && mkdir -p .gpu/data/cifar10 .gpu/NAYER

download() {  # download DIR PACKAGE==VERSION...: wheels for the GPU machine's Python 3.12
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$@"
}
# Ours (ml_collections, tensorboardX) and NAYER's (kornia, kornia_rs; termcolor and xlsxwriter,
# which its datafree package imports) that the machine's image lacks.
download .gpu/whl ml_collections==1.1.0 tensorboardX==2.6.5 kornia==0.9.0 kornia_rs==0.2.0 \
  termcolor==3.3.0 xlsxwriter==3.3.1
download .gpu/whl_fallback flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 chex==0.1.92

if git -C "$NAYER" rev-parse HEAD >.gpu/NAYER.commit 2>/dev/null; then
  git -C "$NAYER" archive HEAD | tar -x -C .gpu/NAYER
else
  cp -r "$NAYER"/. .gpu/NAYER/
fi
rm -rf .gpu/NAYER/label_embedding/imagenet_le.pickle .gpu/NAYER/*.JPG .gpu/NAYER/*.jpg .gpu/NAYER/.git

caedfkd convert "$DATA/teachers/akamaster-cifar10/resnet56-4bfd9763.th" --arch resnet56 \
  --num-classes 10 --preset akamaster --out .gpu/teachers/resnet56 >/dev/null
cp -r "$DATA/cifar10/test" .gpu/data/cifar10/
du -sh .gpu
