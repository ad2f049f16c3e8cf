"""`python -m veil.services.keyvault`: run the keyvault service in the foreground (the image's entrypoint)."""

from __future__ import annotations

from veil.services.keyvault.server import main

raise SystemExit(main())
