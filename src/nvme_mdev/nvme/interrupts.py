"""How the controller asks for interrupts; the PCI function delivers them (MSI-X or INTx).

MSI-X goes through `VectorRoutes`: where each vector goes (the client's eventfd, or
nowhere while it is masked), shared by the PCI function's MSI-X capability, which
decides the routes, and the data plane, which signals through them without asking
anyone (the native data plane's thread holds no GIL). pci/msix.py has the Python
implementation; the native data plane brings its own (dataplane.make_vector_routes).
"""

from __future__ import annotations

from typing import Protocol


class VectorRoutes(Protocol):
    @property
    def enabled(self) -> bool:
        """MSI-X is on (else completions are signalled on INTx)."""
        ...

    def set_enabled(self, on: bool) -> None: ...

    def signal(self, vector: int) -> None:
        """Send `vector` to its eventfd, or set its pending bit while it has none."""
        ...

    def route(self, vector: int, fd: int) -> None:
        """Where `vector` goes from now on (-1: nowhere); a pending vector that gets an
        eventfd fires once and its pending bit clears."""
        ...

    def pending(self, vector: int) -> bool: ...

    def clear_pending(self) -> None: ...


class InterruptSink(Protocol):
    #: where MSI-X vectors go (the data plane signals I/O completions through it)
    routes: VectorRoutes

    def msix_enabled(self) -> bool:
        """True when completions are signalled per vector through MSI-X."""
        ...

    def signal(self, vector: int) -> None:
        """Send MSI-X message `vector` (a masked vector gets its pending bit instead)."""
        ...

    def set_intx(self, asserted: bool) -> None:
        """Drive the INTx pin (used when MSI-X is off)."""
        ...
