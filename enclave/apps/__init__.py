"""The app table: every app the enclave runs, by AppKind."""

from __future__ import annotations

from enclave.apps.ballot import BallotApp
from enclave.apps.base import App
from enclave.apps.token import TokenApp
from enclave.apps.vault import VaultApp

APPS: dict[int, App] = {app.kind: app for app in (VaultApp(), TokenApp(), BallotApp())}

__all__ = ["APPS", "App"]
