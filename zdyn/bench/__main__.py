from __future__ import annotations

import sys

from zdyn.bench.cli import main

sys.exit(main())
