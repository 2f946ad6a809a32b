#!/usr/bin/env bash
# Primary initialisation for compose.yaml's `postgres` service.
#
# Mounted into /docker-entrypoint-initdb.d, so the postgres image runs it exactly once, when the
# data directory is first created, against its temporary socket-only server (as the `postgres`
# OS user, with POSTGRES_USER, POSTGRES_DB and PGDATA set). It prepares the primary for the
# `postgres-replica` hot standby and creates the read-model database:
#   * a role $REPLICATION_USER WITH REPLICATION LOGIN PASSWORD $REPLICATION_PASSWORD,
#   * a physical replication slot $REPLICATION_SLOT that the standby streams from,
#   * the database $POSTGRES_READ_DB (read models; `almanac migrate` also creates it if missing),
#   * a pg_hba.conf line letting $REPLICATION_USER open replication connections.
#
# It works both when the entrypoint sources it and when it executes it, and every statement is
# guarded, so running it again against the same cluster changes nothing.
set -e

replication_user="${REPLICATION_USER:-replicator}"
replication_password="${REPLICATION_PASSWORD:?REPLICATION_PASSWORD must be set for the primary}"
replication_slot="${REPLICATION_SLOT:-almanac_replica_1}"
read_db="${POSTGRES_READ_DB:-almanac_read}"

if ! [[ "$replication_slot" =~ ^[a-z0-9_]{1,63}$ ]]; then
    echo "init-primary: REPLICATION_SLOT must be lower-case letters, digits and underscores, got '$replication_slot'" >&2
    exit 1
fi

psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-${POSTGRES_USER:-postgres}}" \
    --set=repl_user="$replication_user" \
    --set=repl_password="$replication_password" \
    --set=repl_slot="$replication_slot" \
    --set=read_db="$read_db" <<'EOSQL'
SELECT format('CREATE ROLE %I WITH REPLICATION LOGIN PASSWORD %L', :'repl_user', :'repl_password')
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = :'repl_user')
\gexec

SELECT pg_catalog.pg_create_physical_replication_slot(:'repl_slot')
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = :'repl_slot');

SELECT format('CREATE DATABASE %I OWNER %I', :'read_db', current_user)
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_database WHERE datname = :'read_db')
\gexec
EOSQL

hba_line="host replication ${replication_user} all scram-sha-256"
if ! grep -qxF "$hba_line" "$PGDATA/pg_hba.conf"; then
    printf '\n# streaming replication for the postgres-replica hot standby\n%s\n' "$hba_line" \
        >> "$PGDATA/pg_hba.conf"
fi

echo "init-primary: replication role '$replication_user', slot '$replication_slot' and database '$read_db' are ready"
