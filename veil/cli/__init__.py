"""The `veil` command: one module per noun; `main` builds the parser.

gRPC's C core reads its log settings when it loads: they are set here, before any noun imports
grpc, so its TLS and connection logs never reach the command's output (`VEIL_DEBUG=1` keeps
whatever the environment says).
"""

import os

if not os.environ.get("VEIL_DEBUG"):
    os.environ["GRPC_VERBOSITY"] = "NONE"
    os.environ.pop("GRPC_TRACE", None)
