"""A full memory barrier for the Python data plane.

Arming EventIdx before parking is "store EventIdx, fence, load the tail again" against
the guest's "store the tail, fence, load EventIdx" (Linux's nvme_dbbuf_update_and_check_event
has the mb()). x86-64 may let a load pass an earlier store to another address, so the
fence must be a real one (MFENCE or a locked instruction); nothing in Python promises
one, so it comes from the crate: std::sync::atomic::fence(SeqCst).
"""

from __future__ import annotations

from .._native import full_fence

__all__ = ["full_fence"]
