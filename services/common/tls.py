"""Mutual-TLS credentials for servers and channels.

Servers require a client certificate from our CA and reload their own
certificate when the files change (cert-manager rotation needs no restart).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc

from veil.services.common.config import TlsFiles

_log = logging.getLogger(__name__)


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _read_key(path: Path) -> bytes:
    """A private key file, refused when others may read it or anyone but its owner may write it.

    Group read stays allowed: Kubernetes mounts Secrets 0440 for the pod's fsGroup.
    """
    with path.open("rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if mode & 0o027:
            raise PermissionError(
                f"TLS private key {path} has mode {stat.S_IMODE(mode):04o}: other users may read or change "
                f"it; chmod 600 it (`veil pki init --force` rewrites the dev PKI)"
            )
        return handle.read()


class _ReloadingServerConfig:
    """Fetches a new server certificate configuration whenever a TLS file's mtime changes."""

    def __init__(self, tls: TlsFiles):
        self._tls = tls
        self._lock = threading.Lock()
        self._stamp = self._mtimes()

    def _files(self) -> tuple[Path, ...]:
        tls = self._tls
        return (tls.cert, tls.key, tls.ca) + ((tls.admin_ca,) if tls.admin_ca is not None else ())

    def _mtimes(self) -> tuple[float, ...]:
        return tuple(p.stat().st_mtime_ns for p in self._files())

    def build(self) -> grpc.ServerCertificateConfiguration:
        # Clients may chain to the service CA or to the admin CA: a bundle of both. Which
        # identity a leaf of either may carry is the authorization interceptor's check.
        roots = _read(self._tls.ca)
        if self._tls.admin_ca is not None:
            roots = roots.rstrip(b"\n") + b"\n" + _read(self._tls.admin_ca)
        return grpc.ssl_server_certificate_configuration(
            [(_read_key(self._tls.key), _read(self._tls.cert))], root_certificates=roots
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC on new handshakes; None keeps the current configuration."""
        with self._lock:
            try:
                stamp = self._mtimes()
                if stamp == self._stamp:
                    return None
                config = self.build()
            except (OSError, ValueError):
                _log.exception("TLS files changed but could not be reloaded; keeping the old ones")
                return None
            self._stamp = stamp
            _log.info("reloaded TLS certificate from %s", self._tls.cert)
            return config


def server_credentials(tls: TlsFiles, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
    """TLS server credentials, certificate reloaded on change; client certificates required by default.

    `require_client_auth=False` is for the gateway's public port alone: gRPC Python then does
    not even request a client certificate (it has no "optional" mode), so every caller on
    that port is anonymous to the transport.
    """
    tls.check()
    reloading = _ReloadingServerConfig(tls)
    # gRPC accepts None from the fetcher ("no change"); the stub's return type is too narrow.
    fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], reloading.fetch)
    return grpc.dynamic_ssl_server_credentials(
        reloading.build(), fetch, require_client_authentication=require_client_auth
    )


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """mTLS channel credentials presenting this service's certificate."""
    tls.check()
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca), private_key=_read_key(tls.key), certificate_chain=_read(tls.cert)
    )
