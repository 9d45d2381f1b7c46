#!/usr/bin/env python3
"""The guest tool's command line under a short name: `vm.py run --socket PATH ...`
is `guestvm.py run --socket PATH ...` (see guestvm.py, which is also the library)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guestvm import main

if __name__ == "__main__":
    sys.exit(main())
