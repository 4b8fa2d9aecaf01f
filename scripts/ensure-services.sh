#!/usr/bin/env bash
# Start PostgreSQL, Redis and RabbitMQ when they are installed but not answering, then insist they answer.
# The tests never skip for a missing service: if this fails, the suite must not run.
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}
RABBITMQ_PORT=${RABBITMQ_PORT:-5672}

pg_up() { pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
# An AMQP handshake: RabbitMQ answers a protocol header with its Connection.Start (starts "\x01").
rabbitmq_up() {
  timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$RABBITMQ_PORT && printf 'AMQP\x00\x00\x09\x01' >&3 && head -c 1 <&3" 2>/dev/null | od -An -tx1 | grep -q 01
}

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

if ! rabbitmq_up && command -v rabbitmq-server >/dev/null; then
  echo "starting RabbitMQ" >&2
  rabbitmq-server -detached || true
fi

# RabbitMQ (Erlang) takes a while to boot.
for _ in $(seq 1 90); do
  if pg_up && redis_up && rabbitmq_up; then
    echo "PostgreSQL, Redis and RabbitMQ are up" >&2
    exit 0
  fi
  sleep 1
done
pg_up || echo "PostgreSQL is not answering on $PGHOST:$PGPORT" >&2
redis_up || echo "Redis is not answering on 127.0.0.1:$REDIS_PORT" >&2
rabbitmq_up || echo "RabbitMQ is not answering on 127.0.0.1:$RABBITMQ_PORT" >&2
exit 1
