"""The PCI function of the NVMe controller: config space, capabilities, BARs,
MSI-X and INTx, served to the vfio-user transport as a `Device`."""

from .function import Bar0Handler, NvmePciFunction

__all__ = ["Bar0Handler", "NvmePciFunction"]
