#!/usr/bin/env bash
# Entrypoint of compose.yaml's `postgres-replica` service: a streaming hot standby of `postgres`.
#
#   1. waits until the primary accepts connections;
#   2. if $PGDATA holds no cluster yet, clones the primary with
#        pg_basebackup -h $PRIMARY_HOST -U $REPLICATION_USER -D ... -R -X stream -S $REPLICATION_SLOT -P
#      into a staging directory next to $PGDATA and renames it into place only once complete
#      (-R writes standby.signal and primary_conninfo/primary_slot_name, so the copy starts as a
#      standby); the password comes from PGPASSWORD;
#   3. if $PGDATA holds a cluster of a different primary (the primary's volume was recreated),
#      discards it and clones again: a standby's data is only ever a copy of the primary's;
#   4. execs postgres with its arguments (the service's `command:`) plus hot_standby=on.
#
# Runs as the `postgres` user (compose sets `user: postgres`); started as root it drops to
# postgres with gosu, as the image's own entrypoint does.
#
# Environment:
#   PGDATA                 data directory; must be a subdirectory of the mounted volume
#   PGPASSWORD             password of the replication role (required)
#   PRIMARY_HOST           primary's host name                  (default: postgres)
#   PRIMARY_PORT           primary's port                       (default: 5432)
#   REPLICATION_USER       role WITH REPLICATION on the primary (default: replicator)
#   REPLICATION_SLOT       physical slot on the primary         (default: almanac_replica_1)
#   PRIMARY_WAIT_SECONDS   how long to wait for the primary before failing (default: 300)
set -Eeuo pipefail

log() {
    printf '%s replica-entrypoint: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

: "${PGDATA:?PGDATA must be set}"
PGDATA="${PGDATA%/}"
export PGDATA

if [ "$(id -u)" = '0' ]; then
    parent="$(dirname "$PGDATA")"
    mkdir -p "$parent"
    chown postgres:postgres "$parent"
    chmod 0700 "$parent" 2>/dev/null || :
    exec gosu postgres bash "${BASH_SOURCE[0]}" "$@"
fi

: "${PGPASSWORD:?PGPASSWORD must hold the password of the replication role}"
export PGPASSWORD
PRIMARY_HOST="${PRIMARY_HOST:-postgres}"
PRIMARY_PORT="${PRIMARY_PORT:-5432}"
REPLICATION_USER="${REPLICATION_USER:-replicator}"
REPLICATION_SLOT="${REPLICATION_SLOT:-almanac_replica_1}"
PRIMARY_WAIT_SECONDS="${PRIMARY_WAIT_SECONDS:-300}"

if ! [[ "$REPLICATION_SLOT" =~ ^[a-z0-9_]{1,63}$ ]]; then
    log "REPLICATION_SLOT must be lower-case letters, digits and underscores, got '$REPLICATION_SLOT'"
    exit 1
fi

# With arguments that are only options, run postgres with them (like the image's entrypoint).
if [ "$#" -eq 0 ] || [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi

# A physical replication connection to the primary (the same kind pg_basebackup opens).
replication_conninfo="host=$PRIMARY_HOST port=$PRIMARY_PORT user=$REPLICATION_USER dbname=replication replication=true application_name=postgres-replica connect_timeout=5"

replication_command() {  # command: prints the result rows, fields separated by '|'
    psql "$replication_conninfo" --no-psqlrc --no-align --tuples-only --command "$1"
}

wait_for_primary() {
    local deadline=$((SECONDS + PRIMARY_WAIT_SECONDS))
    until pg_isready --quiet --host "$PRIMARY_HOST" --port "$PRIMARY_PORT" \
            --username "$REPLICATION_USER" --dbname postgres --timeout 5; do
        if ((SECONDS >= deadline)); then
            log "the primary $PRIMARY_HOST:$PRIMARY_PORT did not accept connections within ${PRIMARY_WAIT_SECONDS}s"
            exit 1
        fi
        log "waiting for the primary $PRIMARY_HOST:$PRIMARY_PORT"
        sleep 2
    done
}

has_cluster() {
    [ -s "$PGDATA/PG_VERSION" ]
}

local_system_id() {
    LC_ALL=C pg_controldata "$PGDATA" | sed -n 's/^Database system identifier:[[:space:]]*//p'
}

primary_system_id() {
    replication_command 'IDENTIFY_SYSTEM' | cut -d'|' -f1
}

slot_exists() {
    # READ_REPLICATION_SLOT (PostgreSQL 15+) answers one row whose slot_type is empty for a
    # slot that does not exist.
    local slot_type
    slot_type="$(replication_command "READ_REPLICATION_SLOT $REPLICATION_SLOT" | cut -d'|' -f1)"
    [ -n "$slot_type" ]
}

clone_primary() {
    local staging="$PGDATA.basebackup"
    rm -rf "$staging"

    local slot_args=(--slot "$REPLICATION_SLOT")
    if slot_exists; then
        log "cloning $PRIMARY_HOST:$PRIMARY_PORT with pg_basebackup through slot '$REPLICATION_SLOT'"
    else
        # The primary's init script creates the slot; create it here if someone removed it.
        log "slot '$REPLICATION_SLOT' is missing on the primary: pg_basebackup creates it"
        slot_args+=(--create-slot)
    fi

    pg_basebackup \
        --host "$PRIMARY_HOST" --port "$PRIMARY_PORT" --username "$REPLICATION_USER" \
        --no-password \
        --pgdata "$staging" \
        --write-recovery-conf \
        --wal-method stream \
        "${slot_args[@]}" \
        --checkpoint fast \
        --progress

    chmod 0700 "$staging"
    # What is left at $PGDATA holds no cluster (no PG_VERSION): an interrupted earlier start.
    if [ -e "$PGDATA" ]; then
        rm -rf "$PGDATA"
    fi
    mv "$staging" "$PGDATA"
    log "clone complete: $PGDATA is a standby of $PRIMARY_HOST:$PRIMARY_PORT"
}

wait_for_primary

if has_cluster; then
    local_id="$(local_system_id)"
    primary_id="$(primary_system_id || true)"
    if [ -n "$primary_id" ] && [ -n "$local_id" ] && [ "$primary_id" != "$local_id" ]; then
        log "$PGDATA belongs to another cluster (system identifier $local_id, primary's $primary_id): cloning again"
        rm -rf "$PGDATA"
        clone_primary
    elif [ ! -e "$PGDATA/standby.signal" ]; then
        log "warning: $PGDATA has no standby.signal, so it starts as a primary of its own (was it promoted?)"
    else
        log "$PGDATA already holds a standby of $PRIMARY_HOST:$PRIMARY_PORT"
    fi
else
    clone_primary
fi

chmod 0700 "$PGDATA"

log "starting postgres as a hot standby"
exec "$@" -c hot_standby=on
