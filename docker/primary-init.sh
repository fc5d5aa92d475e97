#!/bin/sh
# Lets the replica container stream from the primary (run once, at the primary's first start).
set -e
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
