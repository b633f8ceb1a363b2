#!/bin/sh
# Entrypoint of `db-standby` (deploy/failover/compose.yml): the first time, copy the primary with
# `pg_basebackup -R` (a streaming standby of `db`) and make it the primary's synchronous standby;
# then hand over to the image's own entrypoint, which finds an initialised cluster and starts
# `postgres` as its user. Plain sh: it runs in the public image (Alpine or Debian) and in CI's.
set -eu

: "${POSTGRES_USER:=postgres}"
: "${PRIMARY_HOST:=db}"
: "${STANDBY_NAME:=standby}"
: "${PGDATA:=/var/lib/postgresql/data}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    # The password only through the environment of these two commands, never on a command line.
    export PGPASSWORD="${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is not set}"
    echo "standby: copying $PRIMARY_HOST with pg_basebackup -R"
    mkdir -p "$PGDATA"
    if ! pg_basebackup --host="$PRIMARY_HOST" --username="$POSTGRES_USER" --pgdata="$PGDATA" \
            --write-recovery-conf --wal-method=stream --checkpoint=fast --no-password; then
        # A half-copied directory would look initialised next time: start again from nothing.
        find "$PGDATA" -mindepth 1 -delete
        exit 1
    fi
    chmod 700 "$PGDATA"
    chown -R postgres:postgres "$PGDATA" 2> /dev/null || true
    # From now on every commit on the primary waits until this standby has flushed it
    # (synchronous_commit = on is the default and compose sets it explicitly). The standby is
    # named by its cluster_name (compose passes -c cluster_name=$STANDBY_NAME). The setting goes to
    # the primary's postgresql.auto.conf after the copy was taken, so this standby, once promoted,
    # does not wait for a standby of its own.
    psql --host="$PRIMARY_HOST" --username="$POSTGRES_USER" --dbname=postgres --no-password \
        --set=ON_ERROR_STOP=1 --quiet \
        --command="ALTER SYSTEM SET synchronous_standby_names = '\"$STANDBY_NAME\"'" \
        --command="SELECT pg_reload_conf()" > /dev/null
    unset PGPASSWORD
    echo "standby: copied; $PRIMARY_HOST now waits for \"$STANDBY_NAME\" on every commit"
fi

exec docker-entrypoint.sh "$@"
