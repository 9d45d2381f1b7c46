"""nvme-mdev: virtual NVMe controllers over vfio-user, backed by slices of host storage."""

__version__ = "0.1.0"
