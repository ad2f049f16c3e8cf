"""How the state host starts its enclave: the runner process with the configured providers.

The runner is `python -m veil.enclave.runner` behind a pipe (services/state/enclave_host.py); in
``sim`` mode it quotes with the dev PCK chain next to the CA and seals with the simulated
platform secret file (created on first start); in ``gramine`` mode both come from
``/dev/attestation`` inside Gramine-SGX.
"""

from __future__ import annotations

from veil.enclave.runner import RunnerOptions
from veil.services.state.config import StateConfig
from veil.services.state.enclave_host import EnclaveHost


def runner_options(config: StateConfig) -> RunnerOptions:
    """The runner's options for this configuration."""
    sim = config.enclave_mode == "sim"
    return RunnerOptions(
        quote_provider=config.enclave_mode,
        seal_provider=config.enclave_mode,
        pck_dir=config.pck_dir if sim else None,
        platform_secret=config.platform_secret if sim else None,
        memory_mb=config.enclave_memory_mb,
    )


def spawn_enclave(config: StateConfig) -> EnclaveHost:
    """Start the enclave runner as its own process (the production shape)."""
    return EnclaveHost.spawn(runner_options(config))


def in_process_enclave(config: StateConfig) -> EnclaveHost:
    """The same enclave inside this process (unit tests only: no process boundary)."""
    return EnclaveHost.in_process(runner_options(config))
