#!/usr/bin/env bash
# Creates the airflow-memsafe facts database and its owner role.
#
# Run by the postgres image's entrypoint from /docker-entrypoint-initdb.d on the first start
# (empty data volume), as the superuser POSTGRES_USER. Idempotent, so it can also be run by
# hand against an existing server:
#   FACTS_DB=osm_facts FACTS_USER=osm_facts FACTS_PASSWORD=... \
#     PGHOST=... POSTGRES_USER=postgres bash deploy/postgres-init/10-facts-db.sh
#
# The tables (fact_geo_region_features, pipeline_metrics) and views are created by the
# operators themselves; this only provides the database they connect to (AIRFLOW_CONN_OSM_FACTS).
set -eo pipefail  # not -u: the postgres entrypoint may source this file

FACTS_DB="${FACTS_DB:-osm_facts}"
FACTS_USER="${FACTS_USER:-osm_facts}"
FACTS_PASSWORD="${FACTS_PASSWORD:-osm_facts}"

echo "airflow-memsafe: ensuring role ${FACTS_USER} and database ${FACTS_DB}"

# psql variables (:'name' quotes a literal, format() %I quotes an identifier) keep names and
# the password safely quoted; \gexec runs the generated statement only when it is needed
# (CREATE DATABASE cannot run inside a DO block).
psql -v ON_ERROR_STOP=1 --no-psqlrc \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v facts_db="${FACTS_DB}" -v facts_user="${FACTS_USER}" \
    -v facts_password="${FACTS_PASSWORD}" <<'EOSQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'facts_user', :'facts_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'facts_user')
\gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'facts_db', :'facts_user')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'facts_db')
\gexec
SELECT format('GRANT ALL PRIVILEGES ON DATABASE %I TO %I', :'facts_db', :'facts_user')
\gexec
EOSQL

# The role owns the database, so it can create the tables; make sure it owns the public
# schema too (PostgreSQL 15+ no longer lets every user create there).
psql -v ON_ERROR_STOP=1 --no-psqlrc \
    --username "${POSTGRES_USER:-postgres}" --dbname "${FACTS_DB}" \
    -v facts_user="${FACTS_USER}" <<'EOSQL'
SELECT format('ALTER SCHEMA public OWNER TO %I', :'facts_user')
\gexec
EOSQL
