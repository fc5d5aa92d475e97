#!/bin/sh
# Entrypoint of the local PostgreSQL image built by .ci/postgres-image.sh (busybox sh).
#
# Mirrors the parts of the official `postgres` image's entrypoint that the test harness uses:
#   POSTGRES_USER (default postgres), POSTGRES_PASSWORD, POSTGRES_DB (default $POSTGRES_USER),
#   POSTGRES_HOST_AUTH_METHOD (default scram-sha-256; `trust` allows an empty password),
#   arguments starting with `-` (e.g. `-c work_mem=8MB`) are passed on to `postgres`.
# and adds streaming replicas:
#   REPLICATE_FROM=host[:port]  make the data directory with `pg_basebackup -R -X stream` from
#                               that primary (instead of initdb) and start as a hot standby;
#                               credentials: REPLICATION_USER / REPLICATION_PASSWORD, defaulting
#                               to POSTGRES_USER / POSTGRES_PASSWORD; waits up to
#                               REPLICATE_TIMEOUT seconds (default 60) for the primary.
# A data directory that already holds a cluster (a restarted container) is started as is.
# The image holds a cluster made at build time, which a first start only configures.
# The server logs to stderr (`docker logs`).
set -eu

PGDATA=${PGDATA:-/var/lib/postgresql/data}
export PGDATA

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
	set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
	exec "$@"
fi
shift

if [ "$(id -u)" = 0 ]; then
	mkdir -p "$PGDATA" /run/postgresql
	chown postgres:postgres "$PGDATA" /run/postgresql
	chmod 700 "$PGDATA"
	# Drop to the postgres user and run this script again. (`--`: the arguments may start with -c.)
	exec su postgres -s /bin/sh -c 'exec "$0" postgres "$@"' -- "$0" "$@"
fi

POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_PASSWORD=${POSTGRES_PASSWORD:-}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
AUTH=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
TEMPLATE_MARK=.pgtestkit-built-in

log() { echo "entrypoint: $*" >&2; }

# Runs SQL in single-user mode (no server needed); shows its output only if it fails.
single_user() {
	out=$(mktemp)
	if ! postgres --single -D "$PGDATA" postgres >"$out" 2>&1; then
		cat "$out" >&2
		rm -f "$out"
		exit 1
	fi
	rm -f "$out"
}

sql_literal() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/''/g")"; }
sql_ident() { printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }

# Settings and pg_hba.conf of a new primary.
configure() {
	cat >> "$PGDATA/postgresql.conf" <<-EOF

		# local image (.ci/postgres-image.sh)
		listen_addresses = '*'
		fsync = off
		wal_level = replica
		max_wal_senders = 10
		wal_keep_size = '64MB'
		hot_standby = on
		logging_collector = off
		log_destination = 'stderr'
		password_encryption = 'scram-sha-256'
		jit = off
	EOF
	cat > "$PGDATA/pg_hba.conf" <<-EOF
		# TYPE  DATABASE     USER  ADDRESS  METHOD
		local   all          all            trust
		local   replication  all            trust
		host    replication  all   all      $AUTH
		host    all          all   all      $AUTH
	EOF
}

if [ -z "$POSTGRES_PASSWORD" ] && [ "$AUTH" != trust ] && [ -z "${REPLICATE_FROM:-}" ] &&
	{ [ ! -s "$PGDATA/PG_VERSION" ] || [ -f "$PGDATA/$TEMPLATE_MARK" ]; }; then
	log "POSTGRES_PASSWORD is empty: set it, or POSTGRES_HOST_AUTH_METHOD=trust"
	exit 1
fi

# The image comes with a cluster made by initdb at build time (superuser postgres, no
# password yet), which a first start only configures: much faster than initdb. It is not
# used for a replica or another superuser.
if [ -f "$PGDATA/$TEMPLATE_MARK" ] && { [ -n "${REPLICATE_FROM:-}" ] || [ "$POSTGRES_USER" != postgres ]; }; then
	rm -rf "${PGDATA:?}"/* "$PGDATA/$TEMPLATE_MARK"
fi

if [ ! -s "$PGDATA/PG_VERSION" ] && [ -n "${REPLICATE_FROM:-}" ]; then
	host=${REPLICATE_FROM%:*}
	port=${REPLICATE_FROM##*:}
	if [ "$host" = "$REPLICATE_FROM" ]; then port=5432; fi
	user=${REPLICATION_USER:-$POSTGRES_USER}
	password=${REPLICATION_PASSWORD:-$POSTGRES_PASSWORD}
	# The WAL receiver reads the password from ~/.pgpass.
	if [ -n "$password" ]; then
		printf '%s:%s:*:%s:%s\n' "$host" "$port" "$user" "$password" > "$HOME/.pgpass"
		chmod 600 "$HOME/.pgpass"
	fi
	deadline=$(( $(date +%s) + ${REPLICATE_TIMEOUT:-60} ))
	log "pg_basebackup from $host:$port as $user"
	until PGPASSWORD=$password pg_basebackup -D "$PGDATA" -R -X stream -c fast --no-sync -w \
		-h "$host" -p "$port" -U "$user"; do
		if [ "$(date +%s)" -ge "$deadline" ]; then
			log "giving up on $host:$port"
			exit 1
		fi
		rm -rf "${PGDATA:?}"/* 2>/dev/null || true
		sleep 1
	done
	chmod 700 "$PGDATA"
	log "base backup done; starting as a hot standby"
elif [ -f "$PGDATA/$TEMPLATE_MARK" ]; then
	configure
	{
		if [ -n "$POSTGRES_PASSWORD" ]; then
			echo "ALTER ROLE postgres PASSWORD $(sql_literal "$POSTGRES_PASSWORD")"
		fi
		if [ "$POSTGRES_DB" != postgres ]; then
			echo "CREATE DATABASE $(sql_ident "$POSTGRES_DB")"
		fi
	} | single_user
	rm -f "$PGDATA/$TEMPLATE_MARK"
	log "configured the built-in cluster"
elif [ ! -s "$PGDATA/PG_VERSION" ]; then
	pwfile=$(mktemp)
	printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
	pwopt=--pwfile=$pwfile
	if [ -z "$POSTGRES_PASSWORD" ]; then pwopt=; fi
	initdb -D "$PGDATA" -U "$POSTGRES_USER" $pwopt --auth-local=trust --auth-host="$AUTH" \
		-E UTF8 --locale=C --no-sync >&2
	rm -f "$pwfile"
	configure
	if [ "$POSTGRES_DB" != postgres ]; then
		echo "CREATE DATABASE $(sql_ident "$POSTGRES_DB")" | single_user
	fi
	log "initdb done"
fi

exec postgres -D "$PGDATA" "$@"
