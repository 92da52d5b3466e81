#!/usr/bin/env bash
# The default base image of `mlops package`, built where no image registry is reachable: Debian
# bookworm (minbase, from this host's package mirror through mmdebstrap) with Python 3.11 in a
# venv first on PATH (what MLflow's generated Dockerfile expects of a base: `python` and `pip`),
# and this host's CA bundle so pip can reach its index from inside a build.
#   bash scripts/base-image.sh [IMAGE]      (FORCE=1 rebuilds an existing one)
set -euo pipefail
IMAGE="${1:-mlops/python:3.11-bookworm}"
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER="$(command -v docker)"
if [ "${FORCE:-0}" != 1 ] && "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: present"
  exit 0
fi
command -v mmdebstrap >/dev/null || { echo "base image: mmdebstrap missing (apt-get install mmdebstrap)"; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "base image $IMAGE: building from Debian's mirror (about a minute)"
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$work/rootfs.tar"
"$DOCKER" import "$work/rootfs.tar" mlops/rootfs:bookworm >/dev/null
rm -f "$work/rootfs.tar"
ca=/etc/ssl/certs/ca-certificates.crt
if [ -f "$ca" ]; then cp "$ca" "$work/host-ca.crt"; else : >"$work/host-ca.crt"; fi
cat >"$work/Dockerfile" <<'DOCKERFILE'
FROM mlops/rootfs:bookworm
COPY host-ca.crt /etc/ssl/certs/build-host-ca.crt
RUN if [ -s /etc/ssl/certs/build-host-ca.crt ]; then \
      cat /etc/ssl/certs/build-host-ca.crt >> /etc/ssl/certs/ca-certificates.crt; fi \
 && rm /etc/ssl/certs/build-host-ca.crt \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip --version
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8
DOCKERFILE
DOCKER_BUILDKIT=0 "$DOCKER" build --quiet --tag "$IMAGE" "$work" >/dev/null
echo "base image $IMAGE: built ($("$DOCKER" run --rm "$IMAGE" python --version))"
