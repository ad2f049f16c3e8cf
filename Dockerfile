# syntax=docker/dockerfile:1.7
# One image for keyvault, state and gateway; the entrypoint is `python -m` and CMD names the
# module (`veil.services.<service>`, or `veil.services.common.wait` in init containers), so the
# Kubernetes manifests only override CMD. Services start directly, not through the `veil` CLI.
#
#   docker build -t veil:0.1.0 .
#       `runtime` (the default target): sim enclave, and keyvault/gateway anywhere.
#   docker build --target sgx --secret id=enclave-signing-key,src=enclave-key.pem -t veil:0.1.0-sgx .
#       `runtime` + Gramine and the signed enclave manifest, for the AKS overlay.
#
# Not built on the machine this was written on (no Docker engine); tests/deploy checks the
# stages statically.

# Both stages must share one base: the virtualenv copied from `builder` links to its Python.
# Bookworm because Gramine publishes packages for it. Pin by digest in CI (`@sha256:...`).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# builder: compilers live here only, for any dependency without a wheel for this platform.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps keys, venvs and caches out anyway).
COPY pyproject.toml README.md ./
COPY veil/ veil/
COPY services/ services/
COPY enclave/ enclave/
# Build our wheel, then install it with the servers' extra and its exactly pinned dependencies
# into a self-contained virtualenv; pip compiles the bytecode now, because the root filesystem
# is read-only later. veil/enclave and veil/services are links to enclave/ and services/: the
# wheel holds their files.
RUN python -m venv /opt/veil \
 && /opt/veil/bin/python -m pip install pip==25.3 \
 && /opt/veil/bin/python -m pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/veil/bin/python -m pip install "$(ls /wheels/veil-*.whl)[server]" \
 && /opt/veil/bin/python -c "import veil.services.gateway.server, veil.services.keyvault.server, veil.services.state.server"

# ---------------------------------------------------------------------------------------------
# base: what every runtime variant shares. No compilers, no build tools, no source tree.
FROM ${PYTHON_IMAGE} AS base
ENV PATH=/opt/veil/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it and fsGroup matches.
RUN groupadd --system --gid 10001 veil \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin veil
COPY --from=builder /opt/veil /opt/veil
# Main (mTLS) ports 5005x and plaintext health/reflection admin ports 5105x.
EXPOSE 50051 50052 50053 51051 51052 51053
ENTRYPOINT ["python", "-m"]
CMD ["veil.services.gateway"]

# ---------------------------------------------------------------------------------------------
# sgx: adds Gramine and the enclave manifest signed with the project's enclave signing key,
# passed as a BuildKit secret so it never lands in a layer. Signing happens here, in the image
# that runs, because MRENCLAVE covers the hashes of the trusted files in this filesystem.
# The template and its variables belong to enclave/gramine/ (issue 3); the state service in
# `gramine` mode runs the signed manifest from /opt/veil/gramine.
FROM base AS sgx
ARG GRAMINE_TEMPLATE=enclave/gramine/veil-enclave.manifest.template
USER root
# Gramine's apt repository, authenticated by its published keyring. gramine-manifest and
# gramine-sgx-sign come with the package; no compiler is installed.
ADD --chmod=644 https://packages.gramineproject.io/gramine-keyring.gpg /usr/share/keyrings/gramine-keyring.gpg
RUN echo "deb [arch=amd64 signed-by=/usr/share/keyrings/gramine-keyring.gpg] https://packages.gramineproject.io/ bookworm main" \
      > /etc/apt/sources.list.d/gramine.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends gramine \
 && rm -rf /var/lib/apt/lists/*
COPY ${GRAMINE_TEMPLATE} /opt/veil/gramine/veil-runner.manifest.template
RUN --mount=type=secret,id=enclave-signing-key,required=true \
    cd /opt/veil/gramine \
 && gramine-manifest -Dvenv=/opt/veil -Darch_libdir=/lib/x86_64-linux-gnu \
      veil-runner.manifest.template veil-runner.manifest \
 && gramine-sgx-sign --key /run/secrets/enclave-signing-key \
      --manifest veil-runner.manifest --output veil-runner.manifest.sgx \
 && gramine-sgx-sigstruct-view --output-format json veil-runner.sig > mrenclave.json \
 && cat mrenclave.json
USER 10001:10001

# ---------------------------------------------------------------------------------------------
# runtime: the default target (last stage).
FROM base AS runtime
USER 10001:10001
