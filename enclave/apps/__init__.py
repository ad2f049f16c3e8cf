"""The app table: every app the enclave runs, by AppKind."""

from __future__ import annotations

from veil.enclave.apps.ballot import BallotApp
from veil.enclave.apps.base import App
from veil.enclave.apps.token import TokenApp
from veil.enclave.apps.vault import VaultApp

APPS: dict[int, App] = {app.kind: app for app in (VaultApp(), TokenApp(), BallotApp())}

__all__ = ["APPS", "App"]
