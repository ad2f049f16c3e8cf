"""The Python SDK: connect to a gateway, verify the enclave, seal commands, verify receipts.

Its public names are re-exported by the `veil` package itself (`from veil import connect`);
the modules here are `client` (`VeilClient`, `connect`), `apps` (typed vault/token/ballot
clients), `sealing` (the one command sealer), `identity`, `contacts` (who a recipient may
be), `counters`, `pins`, `files` (their atomic writes), `trust_policy` (the expected-measurement
policy a client pins) and `errors`. The SDK never imports the
services (tests/test_layering.py); it verifies with `veil.verify`.
"""
