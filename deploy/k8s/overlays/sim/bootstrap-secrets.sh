#!/usr/bin/env bash
# Create the Secrets the sim overlay expects, with fresh random values, in namespace veil-sim
# (or $1). Idempotent: re-running replaces nothing that exists, so passwords already baked
# into the PostgreSQL data directory keep working.
#
#   veil-postgresql  admin/keyvault/state passwords and the two services' connection URLs
#   veil-kek         the keyvault's key-encryption key (sim uses the `file` KEK provider)
#   veil-sim-pki     the dev SGX root and PCK chain from `veil pki init` (sim quotes)
#
# and the ConfigMap
#
#   keyvault-enclave-policy  the operator enclave policy: the sim enclave built from this
#                            checkout (its MRENCLAVE hashes enclave/**/*.py, so it is specific
#                            to the sources the image was built from), never a debug build
#
# The policy is always rewritten (it holds no secret and follows the code): re-run this script
# after building the image from changed enclave sources, then
# `kubectl -n veil-sim rollout restart deployment/keyvault` (the keyvault reads it at start).
#
# Needs: kubectl (pointed at the cluster), openssl, and the `veil` CLI (`pip install .`), run
# from anywhere; the policy is computed from the checkout this script lives in, with
# $PYTHON (default python3) where Veil is installed.
set -euo pipefail

namespace="${1:-veil-sim}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

exists() { kubectl -n "$namespace" get secret "$1" >/dev/null 2>&1; }

kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f -

if exists veil-postgresql; then
  echo "secret/veil-postgresql exists; kept"
else
  keyvault_pw="$(openssl rand -hex 24)"
  state_pw="$(openssl rand -hex 24)"
  # verify-full against the Veil CA that cert-manager mounts in every Veil pod.
  tls="sslmode=verify-full&sslrootcert=/etc/veil/tls/ca.crt"
  kubectl -n "$namespace" create secret generic veil-postgresql \
    --from-literal=admin-password="$(openssl rand -hex 24)" \
    --from-literal=keyvault-password="$keyvault_pw" \
    --from-literal=state-password="$state_pw" \
    --from-literal=keyvault-url="postgresql://keyvault:${keyvault_pw}@postgresql:5432/keyvault?${tls}" \
    --from-literal=state-url="postgresql://state:${state_pw}@postgresql:5432/state?${tls}"
fi

if exists veil-kek; then
  echo "secret/veil-kek exists; kept (replacing it would orphan every wrapped key)"
else
  head -c 32 /dev/urandom >"$work/kek" # 256-bit AES key, raw bytes
  kubectl -n "$namespace" create secret generic veil-kek --from-file=kek="$work/kek"
fi

if exists veil-sim-pki; then
  echo "secret/veil-sim-pki exists; kept"
else
  veil pki init --data-dir "$work" >/dev/null
  # Only the SGX part: the service certificates come from cert-manager, not from here.
  kubectl -n "$namespace" create secret generic veil-sim-pki \
    --from-file="$work/pki/sgx-root.pem" \
    --from-file="$work/pki/sgx-pck-ca.pem" \
    --from-file="$work/pki/sgx-pck-leaf.pem" \
    --from-file="$work/pki/sgx-pck-leaf-key.pem"
fi

# The sim MRENCLAVE of this checkout and the dev MRSIGNER, as the sim enclave quotes them. From
# the repository root, so the enclave/ package measured is the one `docker build .` copies.
(cd "$repo" && "${PYTHON:-python3}" -c 'import sys; from veil.enclave.measurement import measure_source_tree; from veil.enclave.providers.sim_quote import DEV_MRSIGNER; from veil.dev.policies import dev_enclave_policy_json; sys.stdout.write(dev_enclave_policy_json(measure_source_tree(), DEV_MRSIGNER))') \
  >"$work/enclave-policy.json"
kubectl -n "$namespace" create configmap keyvault-enclave-policy \
  --from-file=enclave-policy.json="$work/enclave-policy.json" --dry-run=client -o yaml |
  kubectl apply -f -
