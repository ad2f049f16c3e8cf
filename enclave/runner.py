"""The enclave runner process: `python -m veil.enclave.runner --quote-provider P --seal-provider S ...`.

Reads length-prefixed EcallFrames from stdin and writes one length-prefixed EcallReply per
frame to stdout; nothing else ever goes to stdout (logs go to stderr). Exits 0 at end of input.
There is no default provider: without explicit choices the runner refuses to start, so a
production deployment cannot silently fall back to simulation. Under SGX the same runner runs
inside Gramine (enclave/gramine/) with `--quote-provider gramine --seal-provider gramine`.

This module and the providers are the only enclave code that touches files: it reads the dev
PCK chain and the simulated platform secret once at start and hands bytes to the providers.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from veil.enclave import framing
from veil.enclave.dispatcher import Dispatcher, error_reply
from veil.enclave.errors import RESOURCE_EXHAUSTED
from veil.enclave.measurement import measure_source_tree
from veil.enclave.providers import QuoteProvider, SealingProvider
from veil.enclave.providers.gramine import DEFAULT_ROOT, GramineQuoteProvider, GramineSealingProvider
from veil.enclave.providers.sealing import SimSealingProvider
from veil.enclave.providers.sim_quote import SimQuoteProvider
from veil.enclave.runtime import DEFAULT_MEMORY_BUDGET, Enclave

_log = logging.getLogger("veil.enclave.runner")

PCK_FILES = ("sgx-pck-leaf.pem", "sgx-pck-ca.pem", "sgx-root.pem")
PCK_KEY_FILE = "sgx-pck-leaf-key.pem"
PROVIDERS = ("sim", "gramine")


@dataclass(frozen=True)
class RunnerOptions:
    """How to build the enclave: providers and their inputs."""

    quote_provider: str
    seal_provider: str
    pck_dir: Path | None = None
    platform_secret: Path | None = None
    memory_mb: int = DEFAULT_MEMORY_BUDGET // (1024 * 1024)
    gramine_root: Path = DEFAULT_ROOT
    isv_prod_id: int = 1
    isv_svn: int = 1
    debug: bool = False

    def to_argv(self) -> list[str]:
        """The command-line arguments that reproduce these options."""
        argv = ["--quote-provider", self.quote_provider, "--seal-provider", self.seal_provider]
        if self.pck_dir is not None:
            argv += ["--pck-dir", str(self.pck_dir)]
        if self.platform_secret is not None:
            argv += ["--platform-secret", str(self.platform_secret)]
        argv += ["--memory-mb", str(self.memory_mb), "--gramine-root", str(self.gramine_root)]
        argv += ["--isv-prod-id", str(self.isv_prod_id), "--isv-svn", str(self.isv_svn)]
        return argv + (["--debug"] if self.debug else [])


def read_platform_secret(path: Path) -> bytes:
    """The simulated CPU's fused secret; created (0600) the first time a node starts."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(secrets.token_bytes(32))
        _log.info("created simulated platform secret %s", path)
    return path.read_bytes()


def build_enclave(options: RunnerOptions) -> Enclave:
    """Build the providers and the enclave; ValueError/OSError/RuntimeError when misconfigured."""
    quotes: QuoteProvider
    sealing: SealingProvider
    if options.quote_provider == "gramine":
        gramine_quotes = GramineQuoteProvider(options.gramine_root)
        mrenclave = gramine_quotes.mrenclave()
        quotes = gramine_quotes
    elif options.quote_provider == "sim":
        if options.pck_dir is None:
            raise ValueError("--quote-provider sim needs --pck-dir")
        mrenclave = measure_source_tree()
        quotes = SimQuoteProvider(
            mrenclave=mrenclave,
            pck_chain_pem=b"".join((options.pck_dir / name).read_bytes() for name in PCK_FILES),
            pck_leaf_key_pem=(options.pck_dir / PCK_KEY_FILE).read_bytes(),
            isv_prod_id=options.isv_prod_id,
            isv_svn=options.isv_svn,
            debug=options.debug,
        )
    else:
        raise ValueError(f"unknown quote provider {options.quote_provider!r}")
    if options.seal_provider == "gramine":
        sealing = GramineSealingProvider(options.gramine_root)
    elif options.seal_provider == "sim":
        if options.platform_secret is None:
            raise ValueError("--seal-provider sim needs --platform-secret")
        sealing = SimSealingProvider(read_platform_secret(options.platform_secret), mrenclave)
    else:
        raise ValueError(f"unknown seal provider {options.seal_provider!r}")
    if options.memory_mb <= 0:
        raise ValueError("--memory-mb must be positive")
    return Enclave(
        mrenclave=mrenclave,
        quote_provider=quotes,
        sealing_provider=sealing,
        default_memory_budget=options.memory_mb * 1024 * 1024,
    )


def serve(
    dispatcher: Dispatcher, stdin: IO[bytes], stdout: IO[bytes], max_frame_size: int = framing.MAX_FRAME_SIZE
) -> None:
    """Answer frames until end of input."""
    while True:
        try:
            frame = framing.read_frame(stdin, max_frame_size)
        except framing.FrameTooLarge:
            framing.write_frame(stdout, error_reply(RESOURCE_EXHAUSTED, "frame too large"))
            continue
        if frame is None:
            return
        framing.write_frame(stdout, dispatcher.handle(frame))


def parse_args(argv: Sequence[str] | None) -> RunnerOptions:
    """Parse the command line (exits 2 on a missing provider choice)."""
    parser = argparse.ArgumentParser(
        prog="python -m veil.enclave.runner", description="Run the Veil enclave over stdin/stdout."
    )
    parser.add_argument("--quote-provider", choices=PROVIDERS, required=True)
    parser.add_argument("--seal-provider", choices=PROVIDERS, required=True)
    parser.add_argument("--pck-dir", type=Path, help="dev PKI dir with the sim PCK chain and leaf key")
    parser.add_argument("--platform-secret", type=Path, help="simulated CPU secret file (created if absent)")
    parser.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_BUDGET // (1024 * 1024))
    parser.add_argument("--gramine-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--isv-prod-id", type=int, default=1)
    parser.add_argument("--isv-svn", type=int, default=1)
    parser.add_argument("--debug", action="store_true", help="set the DEBUG attribute in sim quotes")
    args = parser.parse_args(argv)
    return RunnerOptions(
        quote_provider=args.quote_provider,
        seal_provider=args.seal_provider,
        pck_dir=args.pck_dir,
        platform_secret=args.platform_secret,
        memory_mb=args.memory_mb,
        gramine_root=args.gramine_root,
        isv_prod_id=args.isv_prod_id,
        isv_svn=args.isv_svn,
        debug=args.debug,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the enclave over stdin/stdout."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="enclave: %(levelname)s %(message)s")
    options = parse_args(argv)
    frames_out = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must never corrupt the frame stream
    try:
        dispatcher = Dispatcher(build_enclave(options))
    except (ValueError, OSError, RuntimeError) as error:
        _log.error("refusing to start: %s", error)
        return 1
    _log.info("enclave ready (quote=%s, seal=%s)", options.quote_provider, options.seal_provider)
    try:
        serve(dispatcher, sys.stdin.buffer, frames_out)
    except (framing.FramingError, BrokenPipeError) as error:
        _log.error("host connection broken: %s", error)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
