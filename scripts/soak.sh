#!/usr/bin/env bash
# A soak test, not part of CI: one `nvme-mdev daemon` for a given time under a Linux
# guest's verified fio and a host side that never lets up (namespace hot add/remove,
# list/stats queries, reconnect storms and hostile clients on neighbour controllers),
# with the daemon's RSS, fds and threads sampled as it goes. Exit status 0 only if no
# error was found and the resources stayed flat. See tools/soak.py --help.
#
#   scripts/soak.sh --minutes 30
#   scripts/soak.sh --minutes 5 --sample-seconds 5 --keep
#   scripts/soak.sh --minutes 10 --no-guest      # host side only
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || scripts/setup.sh
guest_tree=${NVME_MDEV_GUEST_DIR:-/var/cache/nvme-mdev/guest}
if [[ " $* " != *" --no-guest "* ]] && [ ! -e "$guest_tree/.nvme-mdev-ready" ]; then
    tools/guest/prepare.sh
fi
exec .venv/bin/python tools/soak.py "$@"
