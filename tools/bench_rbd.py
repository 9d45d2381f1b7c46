"""`nvme-mdev bench --rbd` on a throwaway one-node Ceph cluster: the device serving a
Ceph RBD image against fio's rbd ioengine on the same image, self-contained.

    scripts/bench-rbd.sh                                  # 5 s per row, 256 MiB
    scripts/bench-rbd.sh --seconds 3 --json rbd.json      # any bench option but --rbd*
    scripts/bench-rbd.sh --workloads randread-4k-qd1,randwrite-4k-qd1
    scripts/bench-rbd.sh --cluster-cpus 1 --bench-cpus 0  # the cluster on a CPU of its own

Starts the cluster of tools/ceph_cluster.py (one monitor, one BlueStore OSD on a sparse
file, cephx) in a scratch directory, creates an image of the bench's --size, runs
`nvme-mdev bench --rbd` on it with the other options as given, and removes the cluster
and its directory, also on an error or ^C. Needs ceph-mon, ceph-osd, ceph-common,
librbd1 and fio with its rbd ioengine (scripts/setup.sh installs them, as root).

The cluster's daemons share this machine's CPUs with both sides of every row, unless
--cluster-cpus and --bench-cpus part them (a real cluster runs on other hosts; here an
OSD short of CPU slows whichever side uses more of it): the rows compare the two on one
cluster, in one run; they say nothing of a real cluster's speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ceph_cluster import CephCluster, CephClusterError
from nvme_mdev import bench
from nvme_mdev.cli import build_parser
from nvme_mdev.config import ConfigError, parse_cpu_list

IMAGE = "nvme-mdev-bench"
MIB = 1 << 20


def bench_on(
    cluster: CephCluster, argv: Sequence[str], image: str = IMAGE, out: TextIO | None = None
) -> int:
    """Create `image` in the cluster's pool, of the bench's --size, and run `nvme-mdev
    bench` with `argv` on it (its table to `out`); the bench's exit status. The image
    stays."""
    args = build_parser().parse_args(["bench", *argv])
    if args.rbd is not None or args.spdk is not None or args.scaling:
        raise ConfigError("--rbd, --spdk, --scaling: not here (the image is the cluster's)")
    args.rbd = f"{cluster.pool}/{image}"
    args.rbd_conf, args.rbd_id = cluster.conf_path, cluster.client_id
    args.rbd_keyring = cluster.keyring_path
    opts = bench.options_from_args(args)
    size_mib = -(-opts.size // MIB)  # the image: whole MiB, at least --size
    cluster.run("rbd", "create", "--size", f"{size_mib}M", args.rbd)
    return bench.main(args, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Every other option goes to nvme-mdev bench (nvme-mdev bench --help).",
    )
    parser.add_argument(
        "--cluster-dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the scratch cluster's directory goes (default %(default)s; the OSD's "
        "block file there is sparse, 2 GiB at most)",
    )
    parser.add_argument(
        "--cluster-cpus",
        metavar="CPUS",
        help="run the cluster's daemons on these CPUs (3, 2,5 or 0-3)",
    )
    parser.add_argument(
        "--bench-cpus",
        metavar="CPUS",
        help="run the rest (fio, the device and its guest) on these CPUs",
    )
    ours, rest = parser.parse_known_args(argv)
    try:
        cluster_cpus, bench_cpus = (
            parse_cpu_list(text) if text is not None else None
            for text in (ours.cluster_cpus, ours.bench_cpus)
        )
    except ConfigError as exc:
        print(f"bench-rbd: error: {exc}", file=sys.stderr)
        return 2
    missing = CephCluster.missing()
    if missing:
        print(
            f"bench-rbd: Ceph is not installed (no {', '.join(missing)}; "
            "Debian: apt-get install ceph-mon ceph-osd ceph-common)",
            file=sys.stderr,
        )
        return 1
    root = Path(tempfile.mkdtemp(prefix="nvme-mdev-bench-rbd-", dir=ours.cluster_dir))
    everywhere = os.sched_getaffinity(0)
    try:
        cluster = CephCluster(root)
        print(f"bench-rbd: starting a one-node Ceph cluster in {root}", file=sys.stderr)
        # The daemons, and then fio, the device and its guest, inherit this process's CPUs.
        _run_on(cluster_cpus or everywhere)
        with cluster:
            _run_on(bench_cpus or everywhere)
            return bench_on(cluster, rest)
    except (CephClusterError, ConfigError) as exc:
        print(f"bench-rbd: error: {exc}", file=sys.stderr)
        return 1
    finally:
        os.sched_setaffinity(0, everywhere)
        shutil.rmtree(root, ignore_errors=True)


def _run_on(cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        listed = ",".join(map(str, sorted(cpus)))
        raise ConfigError(
            f"CPUs {listed}: {exc.strerror} (this machine has {os.cpu_count()})"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
