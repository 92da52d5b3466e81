#!/usr/bin/env bash
# Start the services the tests talk to, when this machine has them but they are down.
# PostgreSQL: 127.0.0.1:5432, trust auth, database `test` (tests skip without it, except in CI).
set -u
pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  fi
fi
if pg_up; then echo "PostgreSQL: up at 127.0.0.1:5432"; else echo "PostgreSQL: not available (its tests will skip outside CI)"; fi
bash "$(dirname "$0")/browser.sh"
bash "$(dirname "$0")/delivery.sh"
