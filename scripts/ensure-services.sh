#!/usr/bin/env bash
# Start PostgreSQL and Redis when they are installed but not answering, then insist they answer.
# The tests never skip for a missing service: if this fails, the suite must not run.
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}

pg_up() { pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

if ! pg_up && command -v pg_ctlcluster >/dev/null; then
  echo "starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! redis_up && command -v redis-server >/dev/null; then
  echo "starting Redis" >&2
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi

for _ in $(seq 1 30); do
  if pg_up && redis_up; then
    echo "PostgreSQL and Redis are up" >&2
    exit 0
  fi
  sleep 1
done
pg_up || echo "PostgreSQL is not answering on $PGHOST:$PGPORT" >&2
redis_up || echo "Redis is not answering on 127.0.0.1:$REDIS_PORT" >&2
exit 1
