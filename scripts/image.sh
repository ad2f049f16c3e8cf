#!/usr/bin/env bash
# Build Veil's container image on this machine: `make image`, and the image test in `make test`.
#
#   scripts/image.sh engine     Docker installed (apt, as root) and its daemon running; exit 3
#                               with one line saying why where that cannot be done
#   scripts/image.sh base       the base image (VEIL_BASE_IMAGE, or a cached debootstrap one)
#   scripts/image.sh build      all of the above, then the Dockerfile's $VEIL_IMAGE_TARGET
#                               (default runtime) as $VEIL_IMAGE (default veil:0.1.0), with
#                               $VEIL_BUILD_ARGS added to `docker build` (e.g. the sgx target's
#                               --secret id=enclave-signing-key,src=/path/enclave-key.pem)
#
# No image registry is assumed reachable: the base is Debian bookworm (minbase, python3,
# python3-venv, ca-certificates) from debootstrap, imported once and found again by its label.
# Set VEIL_BASE_IMAGE to use another base (e.g. python:3.11-slim-bookworm where a registry is
# reachable); it must be bookworm-based with python3 and its venv module.
#
# pip inside the build trusts what this machine's pip trusts: the CA bundle ($PIP_CERT,
# $SSL_CERT_FILE or the system bundle) and the http(s) index settings of `pip config list`
# reach the build as BuildKit secrets, mounted only while pip runs, never in a layer.
# Builds and runs use the host network only.
set -euo pipefail

DOCKER="${DOCKER:-/usr/bin/docker}" # Debian's docker.io: its client drives BuildKit
IMAGE="${VEIL_IMAGE:-veil:0.1.0}"
TARGET="${VEIL_IMAGE_TARGET:-runtime}"
BASE_VERSION="bookworm-minbase-python3-v1" # bump when the debootstrap recipe changes
BASE_LABEL="org.veil.base.version"
BASE_TAG="veil-base:$BASE_VERSION"
DEBIAN_MIRROR="${VEIL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKERD_LOG=/var/log/veil-dockerd.log

log() { echo "image: $*" >&2; }
# Exit 3: no engine here, and why (the image test skips with this line; anything else fails).
no_engine() {
  echo "image: no Docker engine: $*" >&2
  exit 3
}

# --- engine ----------------------------------------------------------------------------------

install_packages() {
  local missing=()
  [ -x "$DOCKER" ] || missing+=(docker.io)
  command -v debootstrap >/dev/null || [ -n "${VEIL_BASE_IMAGE:-}" ] || missing+=(debootstrap)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || no_engine "${missing[*]} missing and not root (run: sudo apt-get install ${missing[*]})"
  command -v apt-get >/dev/null || no_engine "${missing[*]} missing and no apt-get to install them"
  log "installing ${missing[*]} (apt)"
  # apt must not start daemons on install: policy-rc.d says no, and only ours is removed again.
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
  fi
  local status=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
    >/tmp/veil-image-apt.log 2>&1 || status=$?
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$status" = 0 ] || no_engine "apt-get install ${missing[*]} failed (exit $status; see /tmp/veil-image-apt.log)"
}

start_daemon() {
  "$DOCKER" info >/dev/null 2>&1 && return 0
  [ "$(id -u)" = 0 ] || no_engine "no Docker daemon answers and starting one needs root"
  command -v dockerd >/dev/null || no_engine "dockerd is not installed"
  log "starting dockerd (log $DOCKERD_LOG)"
  # Host network only: no bridge, no iptables rules, no forwarding. cgroupfs: no systemd here.
  setsid dockerd --storage-driver overlay2 --iptables=false --ip-forward=false --ip-masq=false \
    --bridge=none --exec-opt native.cgroupdriver=cgroupfs >"$DOCKERD_LOG" 2>&1 </dev/null &
  for _ in $(seq 60); do
    "$DOCKER" info >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  no_engine "dockerd did not answer within 30 s ($(tail -n 1 "$DOCKERD_LOG" 2>/dev/null))"
}

engine() {
  install_packages
  start_daemon
}

# --- base image ------------------------------------------------------------------------------

base() {
  if [ -n "${VEIL_BASE_IMAGE:-}" ]; then
    "$DOCKER" image inspect "$VEIL_BASE_IMAGE" >/dev/null 2>&1 || "$DOCKER" pull "$VEIL_BASE_IMAGE" >&2
    echo "$VEIL_BASE_IMAGE"
    return
  fi
  # By name and label: images built on the base inherit its label, so the label alone is not enough.
  local label
  label="$("$DOCKER" image inspect --format "{{ index .Config.Labels \"$BASE_LABEL\" }}" "$BASE_TAG" 2>/dev/null || true)"
  if [ "$label" = "$BASE_VERSION" ]; then
    echo "$BASE_TAG"
    return
  fi
  local root
  root="$(mktemp -d /var/tmp/veil-base.XXXXXX)"
  # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
  trap "rm -rf '$root'" EXIT
  log "debootstrap bookworm into $root (once per machine; ~1-2 min)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$DEBIAN_MIRROR" >/tmp/veil-image-debootstrap.log 2>&1 ||
    {
      log "debootstrap failed; see /tmp/veil-image-debootstrap.log"
      exit 1
    }
  # Caches and logs of the bootstrap are no part of the image.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* \
    "$root"/tmp/* "$root"/debootstrap
  tar -C "$root" -c . | "$DOCKER" import \
    --change "LABEL $BASE_LABEL=$BASE_VERSION" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/usr/bin/python3"]' \
    - "$BASE_TAG" >/dev/null
  rm -rf "$root"
  trap - EXIT
  echo "$BASE_TAG"
}

# --- pip trust, as build secrets -------------------------------------------------------------

# The CA bundle the machine's pip uses.
pip_ca() {
  local candidate
  for candidate in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$candidate" ] && [ -f "$candidate" ]; then
      echo "$candidate"
      return
    fi
  done
}

# A pip.conf with the machine's http(s) index settings (file:// indexes do not exist in the build).
write_pip_conf() {
  local python
  python="$(command -v python3 || true)"
  [ -x "$REPO/.venv/bin/python" ] && python="$REPO/.venv/bin/python"
  {
    echo "[global]"
    if [ -n "$python" ]; then
      "$python" -m pip config list 2>/dev/null |
        sed -nE "s/^[^.]*\.(index-url|extra-index-url|trusted-host)='(.*)'$/\1 \2/p" |
        while read -r key values; do
          local kept=()
          for value in $values; do
            case "$key:$value" in
            trusted-host:* | *:http://* | *:https://*) kept+=("$value") ;;
            esac
          done
          if [ ${#kept[@]} -gt 0 ]; then echo "$key = ${kept[*]}"; fi
        done
    fi
    if [ -n "${PIP_INDEX_URL:-}" ]; then echo "index-url = $PIP_INDEX_URL"; fi
  } | awk -F' = ' '!seen[$1]++' # first setting of each key wins, as in pip's own order
}

# --- build -----------------------------------------------------------------------------------

build() {
  engine
  local base_image
  base_image="$(base)"
  local secrets
  secrets="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$secrets'" EXIT
  write_pip_conf >"$secrets/pip.conf"
  local args=(--secret "id=pip_conf,src=$secrets/pip.conf")
  local ca
  ca="$(pip_ca)"
  [ -n "$ca" ] && args+=(--secret "id=pip_ca,src=$ca")
  log "building $IMAGE (target $TARGET) on $base_image"
  DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain \
    --build-arg "BASE_IMAGE=$base_image" --target "$TARGET" "${args[@]}" ${VEIL_BUILD_ARGS:-} \
    -t "$IMAGE" "$REPO" >&2
  # The image this tag named before is now dangling: drop it (the build cache keeps its layers).
  "$DOCKER" image prune --force --filter "label=$BASE_LABEL" >/dev/null
  rm -rf "$secrets"
  trap - EXIT
  echo "$IMAGE"
}

case "${1:-build}" in
engine) engine ;;
base)
  engine
  base
  ;;
build) build ;;
*)
  echo "usage: $0 [engine|base|build]" >&2
  exit 2
  ;;
esac
