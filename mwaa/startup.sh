#!/usr/bin/env bash
# Amazon MWAA runs this startup script on every Airflow component before it installs requirements.txt
# and starts Airflow; exporting variables here is MWAA's documented way to set them for Airflow.
#
# dbt is not installed beside Airflow on MWAA: dbt-core 1.11 needs protobuf>=6, and Airflow's constraints
# files have pinned protobuf 4.25 (docs/deploy.md). dbt gets a virtualenv of its own, and Cosmos runs its
# `dbt` executable as a subprocess: include/dbt_config.py reads DBT_EXECUTION_MODE and DBT_EXECUTABLE.
# The pins are the ones of ../requirements.txt (tests/test_mwaa_files.py checks that they agree).
#
# No `set -e` and no `exit`: a failed dbt install should not stop Airflow from starting; it is logged
# (CloudWatch, the startup script's log stream) and the dbt tasks fail with `dbt` not found.

DBT_VENV_PATH="${AIRFLOW_HOME:-/usr/local/airflow}/dbt_venv"

if [ ! -x "${DBT_VENV_PATH}/bin/dbt" ]; then
    # MWAA sets PIP_USER=true for its own installs; a virtualenv has no user site.
    if PIP_USER=false python3 -m venv "${DBT_VENV_PATH}" \
        && PIP_USER=false "${DBT_VENV_PATH}/bin/pip" install --quiet --no-cache-dir \
            "dbt-core==1.11.16" "dbt-postgres==1.11.0"; then
        echo "startup.sh: dbt installed in ${DBT_VENV_PATH}"
    else
        echo "startup.sh: installing dbt into ${DBT_VENV_PATH} failed; transform_dbt tasks will fail" >&2
    fi
fi

export DBT_EXECUTION_MODE=virtualenv
export DBT_EXECUTABLE="${DBT_VENV_PATH}/bin/dbt"

# The warehouse's host, port and database, without login or password: include/pipeline.py names the
# warehouse Assets from this variable (else from airflow_settings.yaml, whose host is Astro's local
# container), and Cosmos names the Assets it emits from the real connection; the two must agree.
# Tasks still get the whole connection from Secrets Manager, which Airflow searches before the
# environment. Uncomment with your warehouse (docs/deploy.md, "Connections and secrets"):
# export AIRFLOW_CONN_WAREHOUSE_POSTGRES="postgres://dwh-host.example.internal:5432/warehouse"
