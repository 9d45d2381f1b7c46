"""Upgrade in place: a new process takes over every controller while the VMs run.

- descriptors.py: storage descriptors, recorded so that a successor inherits them;
- document.py: the state document (versioned JSON) and the fds that travel with it;
- upgrade.py: the two processes' conversation (quiesce, hand over, commit or resume).
"""
