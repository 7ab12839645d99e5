# Sourced by .ci/run (and usable by hand): start the services that tests use, on loopback only.
# Each test that needs a service skips with a reason when its variable is unset.
# `ci_services_stop` stops what this script started (a cluster that was already running stays up).

_ci_pg_started=""
ci_services_stop() {
    if [ -n "$_ci_pg_started" ]; then
        # shellcheck disable=SC2086
        pg_ctlcluster $_ci_pg_started stop 2>/dev/null || true
        echo "postgres: stopped"
    fi
}

# PostgreSQL from Debian's packages, for the ledger's backend conformance suite.
if command -v pg_lsclusters >/dev/null 2>&1; then
    cluster=$(pg_lsclusters -h 2>/dev/null | awk 'NR==1 {print $1" "$2}')
    if [ -n "$cluster" ]; then
        if ! pg_lsclusters -h | awk 'NR==1 {print $4}' | grep -q online; then
            # shellcheck disable=SC2086
            pg_ctlcluster $cluster start 2>/dev/null && _ci_pg_started="$cluster"
        fi
        port=$(pg_lsclusters -h | awk 'NR==1 {print $3}')
        if su postgres -c "psql -p $port -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='nightlab'\"" | grep -q 1 \
            || su postgres -c "psql -p $port -qc \"CREATE ROLE nightlab LOGIN SUPERUSER PASSWORD 'nightlab'\""; then
            export NIGHTLAB_TEST_POSTGRES="postgresql+psycopg://nightlab:nightlab@127.0.0.1:$port/postgres"
            echo "postgres: $NIGHTLAB_TEST_POSTGRES"
        fi
    fi
fi
