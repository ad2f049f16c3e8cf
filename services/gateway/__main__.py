"""`python -m veil.services.gateway`: run the gateway service in the foreground (the image's entrypoint)."""

from __future__ import annotations

from veil.services.gateway.server import main

raise SystemExit(main())
