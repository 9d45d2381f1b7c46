#!/usr/bin/env bash
# nvme-mdev serving a Ceph RBD image against fio's rbd ioengine on the same image, in one
# run, on a throwaway one-node Ceph cluster started in a scratch directory and removed
# after: `nvme-mdev bench --rbd` made self-contained. Every option but --cluster-dir goes
# to nvme-mdev bench. See tools/bench_rbd.py --help.
#
#   scripts/bench-rbd.sh                              # 5 s per row, a 256 MiB image
#   scripts/bench-rbd.sh --seconds 3 --json rbd.json
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || scripts/setup.sh
exec .venv/bin/python tools/bench_rbd.py "$@"
