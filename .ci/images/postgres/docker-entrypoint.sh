#!/usr/bin/env bash
# Entrypoint of the CI PostgreSQL image: the subset of the official image's contract that
# testcontainers' PostgresContainer and docker-compose.yml use.
#   POSTGRES_PASSWORD (required unless POSTGRES_HOST_AUTH_METHOD=trust), POSTGRES_USER (postgres),
#   POSTGRES_DB (= POSTGRES_USER), POSTGRES_INITDB_ARGS, PGDATA.
# An empty data directory is initialised once; a volume that already holds a cluster is reused.
set -Eeuo pipefail

# `docker run IMAGE -c fsync=off` means `postgres -c fsync=off`, as in the official image.
if [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi

if [ "$1" != postgres ]; then
    exec "$@"
fi

if [ "$(id -u)" = 0 ]; then
    # A fresh named volume is owned by root: hand it to postgres, then drop privileges.
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

quote_ident() {
    local name=${1//\"/\"\"}
    printf '"%s"' "$name"
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_USER:=postgres}"
    : "${POSTGRES_DB:=$POSTGRES_USER}"
    auth=scram-sha-256
    if [ "${POSTGRES_HOST_AUTH_METHOD:-}" = trust ]; then
        auth=trust
    elif [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "error: POSTGRES_PASSWORD is not set (or set POSTGRES_HOST_AUTH_METHOD=trust)" >&2
        exit 1
    fi

    pwfile=$(mktemp)
    trap 'rm -f "$pwfile"' EXIT
    printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$pwfile"
    # shellcheck disable=SC2086  # POSTGRES_INITDB_ARGS is a list of words, as in the official image
    initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host="$auth" --encoding=UTF8 --locale=C.UTF-8 \
        ${POSTGRES_INITDB_ARGS:-}
    rm -f "$pwfile"
    trap - EXIT

    # Clients come from other containers (compose) or through a published port (testcontainers).
    printf '\nhost all all all %s\n' "$auth" >> "$PGDATA/pg_hba.conf"
    printf "\nlisten_addresses = '*'\n" >> "$PGDATA/postgresql.conf"

    if [ "$POSTGRES_DB" != postgres ]; then
        # Single-user mode: no server listens while the database is being created.
        echo "CREATE DATABASE $(quote_ident "$POSTGRES_DB");" \
            | postgres --single -j -D "$PGDATA" postgres > /dev/null
    fi
    echo "PostgreSQL init process complete; ready for start up."
fi

exec "$@"
