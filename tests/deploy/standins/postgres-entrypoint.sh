#!/bin/bash
# What deploy/compose.yaml asks of the official postgres image, on Debian's PostgreSQL 15: on an empty
# $PGDATA, initdb with POSTGRES_USER as the superuser (password POSTGRES_PASSWORD, scram over TCP) and
# POSTGRES_DB created; then the server in the foreground, as the postgres user, on PGPORT (default
# 5432) and LISTEN_ADDRESSES (default '*').
set -euo pipefail
PGDATA=${PGDATA:-/var/lib/postgresql/data}
: "${POSTGRES_PASSWORD:?the stand-in needs POSTGRES_PASSWORD}"
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
as_postgres() { runuser -u postgres -- "$@"; }

mkdir -p "$PGDATA" /run/postgresql
chown -R postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    chown postgres "$pwfile"
    as_postgres initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-host=scram-sha-256 --auth-local=trust --encoding=UTF8 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        # A private socket and no TCP: the healthcheck (pg_isready) must not see this short-lived server.
        init_socket=$(mktemp -d)
        chown postgres "$init_socket"
        as_postgres pg_ctl --pgdata="$PGDATA" --wait start \
            --options="-c listen_addresses='' -c unix_socket_directories=$init_socket" >/dev/null
        as_postgres psql --host="$init_socket" --username="$POSTGRES_USER" --dbname=postgres --quiet \
            --set ON_ERROR_STOP=1 --command="CREATE DATABASE \"$POSTGRES_DB\""
        as_postgres pg_ctl --pgdata="$PGDATA" --mode=fast --wait stop >/dev/null
        rm -rf "$init_socket"
    fi
fi
exec runuser -u postgres -- postgres -D "$PGDATA" -p "${PGPORT:-5432}" -c "listen_addresses=${LISTEN_ADDRESSES:-*}"
