# One image for keyvault, state and gateway; the entrypoint is `python -m` and CMD names the
# module (`veil.services.<service>`, or `veil.services.common.wait` in init containers), so the
# Kubernetes manifests only override CMD. Services start directly, not through the `veil` CLI.
#
#   make image                      (scripts/image.sh: engine, base image, then this build)
#   DOCKER_BUILDKIT=1 docker build --network host --build-arg BASE_IMAGE=<base> -t veil:0.1.0 .
#       `runtime` (the default target): sim enclave, and keyvault/gateway anywhere.
#   ... --target sgx --secret id=enclave-signing-key,src=enclave-key.pem -t veil:0.1.0-sgx .
#       `runtime` + Gramine and the signed enclave manifest, for the AKS overlay.
#
# Built and run in `make test` (tests/image/). Written for the BuildKit that Debian's docker.io
# ships: no `# syntax=` line (that builder cannot fetch frontends) and no `ADD --chmod`.

# Both stages share one base: the virtualenv copied from `builder` links to its Python. The
# base is Debian bookworm with Debian's python3 (3.11) and python3-venv: bookworm because
# Gramine publishes packages for it, Debian's Python because the sgx stage's Gramine measures
# the interpreter and standard library it finds there. `scripts/image.sh base` builds this
# default with debootstrap (no registry needed) and labels it; any bookworm image with python3
# and python3-venv will do (pin it by digest in CI).
ARG BASE_IMAGE=veil-base:bookworm-minbase-python3-v1

# ---------------------------------------------------------------------------------------------
# builder: build tools live here only. Every dependency ships a wheel for this platform
# (--only-binary), so no compiler is installed at all.
FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The pinned dependencies first, in a layer of their own, and the pinned build backend in a
# virtualenv of its own (/opt/build, never copied out): a change to Veil's sources rebuilds
# only the layers below (seconds), not this one. pip trusts what the building machine's pip
# trusts: its CA bundle and index settings arrive as BuildKit secrets (scripts/image.sh),
# mounted for the step only. pip compiles the bytecode now: the root filesystem is read-only
# later.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_conf \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
 && python3 -m venv /opt/veil \
 && /opt/veil/bin/python -m pip install pip==25.3 \
 && python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["server"]))' \
      > /tmp/requirements.txt \
 && /opt/veil/bin/python -m pip install --only-binary=:all: -r /tmp/requirements.txt \
 && python3 -m venv /opt/build \
 && /opt/build/bin/python -m pip install pip==25.3 \
      "$(python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"])')"
# Only what the wheel is built from (.dockerignore keeps keys, venvs and caches out anyway).
COPY README.md ./
COPY veil/ veil/
COPY services/ services/
COPY enclave/ enclave/
# Build our wheel and install it with the servers' extra (already satisfied above, so this
# checks that the requirements layer is complete) into the virtualenv. veil/enclave and
# veil/services are links to enclave/ and services/: the wheel holds their files.
RUN --mount=type=secret,id=pip_ca --mount=type=secret,id=pip_conf \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
 && /opt/build/bin/python -m pip wheel --no-build-isolation --no-deps --wheel-dir /wheels . \
 && /opt/veil/bin/python -m pip install --only-binary=:all: "$(ls /wheels/veil-*.whl)[server]" \
 && /opt/veil/bin/python -c "import veil.services.gateway.server, veil.services.keyvault.server, veil.services.state.server"

# ---------------------------------------------------------------------------------------------
# base: what every runtime variant shares. No compilers, no build tools, no source tree.
FROM ${BASE_IMAGE} AS base
ENV PATH=/opt/veil/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it and fsGroup matches. It
# owns the data dir and seal cache the manifests mount, so a named volume there (docker run -v
# name:/var/lib/veil) starts out writable for it under a read-only root filesystem.
RUN groupadd --system --gid 10001 veil \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin veil \
 && mkdir -p /var/lib/veil /var/lib/veil-seal \
 && chown 10001:10001 /var/lib/veil /var/lib/veil-seal
COPY --from=builder /opt/veil /opt/veil
# Main (mTLS) ports 5005x and plaintext health/reflection admin ports 5105x.
EXPOSE 50051 50052 50053 51051 51052 51053
ENTRYPOINT ["python", "-m"]
CMD ["veil.services.gateway"]

# ---------------------------------------------------------------------------------------------
# sgx: adds Gramine and the enclave manifest signed with the project's enclave signing key,
# passed as a BuildKit secret so it never lands in a layer. Signing happens here, in the image
# that runs, because MRENCLAVE covers the hashes of the trusted files in this filesystem.
# The template and its variables belong to enclave/gramine/ (its README); the signed manifest,
# its signature and the measurement (mrenclave.json) are in /opt/veil/gramine.
FROM base AS sgx
ARG GRAMINE_TEMPLATE=enclave/gramine/veil-enclave.manifest.template
USER root
# Gramine's apt repository, authenticated by its published keyring (ADD leaves it 0600: apt
# reads it as another user). gramine-manifest and gramine-sgx-sign come with the package; no
# compiler is installed.
ADD https://packages.gramineproject.io/gramine-keyring.gpg /usr/share/keyrings/gramine-keyring.gpg
RUN chmod 644 /usr/share/keyrings/gramine-keyring.gpg \
 && echo "deb [arch=amd64 signed-by=/usr/share/keyrings/gramine-keyring.gpg] https://packages.gramineproject.io/ bookworm main" \
      > /etc/apt/sources.list.d/gramine.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends gramine \
 && rm -rf /var/lib/apt/lists/*
COPY ${GRAMINE_TEMPLATE} /opt/veil/gramine/veil-enclave.manifest.template
# The template's `veil_root` holds veil/__init__.py and enclave/ side by side (the checkout's
# layout): copies of the installed package's files, so what is measured is what is installed.
# The interpreter and standard library are Debian's, which gramine-manifest's `python.*` name.
RUN --mount=type=secret,id=enclave-signing-key,required=true \
    cd /opt/veil/gramine \
 && site=/opt/veil/lib/python3.11/site-packages \
 && mkdir -p root/veil \
 && cp "$site/veil/__init__.py" root/veil/ \
 && cp -r "$site/veil/enclave" root/enclave \
 && gramine-manifest -Dentrypoint=/usr/bin/python3.11 -Darch_libdir=/lib/x86_64-linux-gnu \
      -Dveil_root=/opt/veil/gramine/root -Dsite_packages=/opt/veil/lib/python3.11/site-packages \
      -Dmemory_mb=96 -Disv_prod_id=1 -Disv_svn=1 -Denclave_size=2G -Dlog_level=error \
      veil-enclave.manifest.template veil-enclave.manifest \
 && gramine-sgx-sign --key /run/secrets/enclave-signing-key \
      --manifest veil-enclave.manifest --output veil-enclave.manifest.sgx \
 && gramine-sgx-sigstruct-view --output-format json veil-enclave.sig > mrenclave.json \
 && cat mrenclave.json
USER 10001:10001

# ---------------------------------------------------------------------------------------------
# runtime: the default target (last stage).
FROM base AS runtime
USER 10001:10001
