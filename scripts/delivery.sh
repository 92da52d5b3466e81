#!/usr/bin/env bash
# What delivery's tests need from the system, set up once (Debian packages, needs root or
# passwordless sudo): Docker (docker.io, its daemon started in the background where no init
# system runs it), mmdebstrap (the default base image is built from Debian's mirror: no image
# registry needed), and a Java runtime for Spark (default-jre-headless). Then the base image
# itself (scripts/base-image.sh). Never fails the run: without them the delivery tests skip on a
# laptop and fail in CI.
set -u
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
fi
can_install() { command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; }
want=()
[ -x /usr/bin/docker ] && [ -x /usr/sbin/dockerd ] || want+=(docker.io)
command -v mmdebstrap >/dev/null 2>&1 || want+=(mmdebstrap)
command -v java >/dev/null 2>&1 || want+=(default-jre-headless)
if [ ${#want[@]} -gt 0 ]; then
  if can_install; then
    log="$(mktemp)"
    echo "delivery: installing ${want[*]} (Debian packages)"
    if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${want[@]}" >"$log" 2>&1; then
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -q >>"$log" 2>&1
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${want[@]}" >>"$log" 2>&1 \
        || { echo "delivery: apt-get install failed; last lines:"; tail -n 5 "$log" | sed 's/^/  /'; }
    fi
    rm -f "$log"
  else
    echo "delivery: ${want[*]} missing and not installable here (no apt-get or not root)"
  fi
fi
command -v java >/dev/null 2>&1 && echo "Java: $(java -version 2>&1 | head -n1)"
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER="$(command -v docker || true)"
if [ -z "$DOCKER" ]; then echo "Docker: not available (image tests skip outside CI)"; exit 0; fi
if ! $SUDO "$DOCKER" info >/dev/null 2>&1; then
  if [ -x /usr/sbin/dockerd ] && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "Docker: starting dockerd in the background (log: /tmp/mlops-dockerd.log)"
    $SUDO sh -c 'nohup /usr/sbin/dockerd >/tmp/mlops-dockerd.log 2>&1 &'
    for _ in $(seq 1 60); do $SUDO "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  fi
fi
if ! $SUDO "$DOCKER" info >/dev/null 2>&1; then
  echo "Docker: daemon not reachable (image tests skip outside CI)"; exit 0
fi
echo "Docker: up ($($SUDO "$DOCKER" version --format '{{.Server.Version}}' 2>/dev/null))"
bash "$(dirname "$0")/base-image.sh" || { echo "delivery: the base image could not be built"; exit 0; }
# the layers every `mlops package` image starts with (MLflow, the server's packages), built in
# the background while the other tests run; the image tests run last (tests/conftest.py)
PY="${VENV:-.venv}/bin/python"
if [ -x "$PY" ]; then
  echo "Docker: warming the image cache in the background (log: /tmp/mlops-warm-cache.log)"
  nohup "$PY" -m mlops.delivery.image --warm-cache >/tmp/mlops-warm-cache.log 2>&1 &
fi
exit 0
