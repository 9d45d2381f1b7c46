"""How the controller asks for interrupts; the PCI function delivers them (MSI-X or INTx)."""

from __future__ import annotations

from typing import Protocol


class InterruptSink(Protocol):
    def msix_enabled(self) -> bool:
        """True when completions are signalled per vector through MSI-X."""
        ...

    def signal(self, vector: int) -> None:
        """Send MSI-X message `vector` (a masked vector gets its pending bit instead)."""
        ...

    def set_intx(self, asserted: bool) -> None:
        """Drive the INTx pin (used when MSI-X is off)."""
        ...
