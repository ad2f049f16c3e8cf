"""`python -m veil.services.state`: run the state service in the foreground (the image's entrypoint)."""

from __future__ import annotations

from veil.services.state.server import main

raise SystemExit(main())
