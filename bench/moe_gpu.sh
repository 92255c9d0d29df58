#!/usr/bin/env bash
# The MoE kernel's GPU checks from a source checkout, on a CUDA machine whose Python has torch and
# triton but not this package installed (its packages are linked under one `plateforme` namespace):
#
#   bench/moe_gpu.sh tests                      # the GPU tests of tests/test_moe_kernel.py
#   bench/moe_gpu.sh bench [moe_kernel.py args] # bench/moe_kernel.py
#   bench/moe_gpu.sh ptx                        # which compiled GEMM kernels use Hopper's wgmma
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
site=${PLATEFORME_SITE:-/tmp/plateforme-site}
if [ ! -e "$site/plateforme/__init__.py" ]; then
    mkdir -p "$site/plateforme"
    ln -sf "$repo"/plateforme/*.py "$site/plateforme/"
    for part in python_backend builders clients ci model_repository; do
        ln -sfn "$repo/$part" "$site/plateforme/$part"
    done
fi
# PYTHONSAFEPATH: the checkout's own plateforme/ folder (the CLI alone) must not shadow the namespace.
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
cd "$repo" || exit 1

case "${1:-}" in
tests)
    python3 -m pytest -p no:cacheprovider -v -s tests/test_moe_kernel.py -k gpu
    ;;
bench)
    shift
    python3 bench/moe_kernel.py "$@"
    ;;
ptx)
    for kernel in gate_up_kernel down_kernel; do
        total=$(find ~/.triton/cache -name "$kernel.ptx" | wc -l)
        wgmma=$(find ~/.triton/cache -name "$kernel.ptx" -exec grep -l wgmma {} + | wc -l)
        echo "$kernel: $wgmma of $total compiled variants use wgmma"
    done
    ;;
*)
    echo "usage: bench/moe_gpu.sh tests | bench [args] | ptx" >&2
    exit 2
    ;;
esac
