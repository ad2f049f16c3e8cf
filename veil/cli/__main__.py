"""`python -m veil.cli ...`: the `veil` command without its console script."""

from __future__ import annotations

from veil.cli.main import main

raise SystemExit(main())
