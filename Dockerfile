# Astro Runtime 3.3 (Airflow 3.3). Its ONBUILD steps install packages.txt and requirements.txt and
# copy this project to /usr/local/airflow; the lines below run after them.
FROM astrocrpublic.azurecr.io/runtime:3.3-2

# No usage telemetry: deployments behind a firewall would log a failed call on every task.
ENV AIRFLOW__COSMOS__ENABLE_TELEMETRY=False \
    AIRFLOW__USAGE_DATA_COLLECTION__ENABLED=False

# dbt runs inside the Airflow worker through dbt's Python API (Cosmos InvocationMode.DBT_RUNNER),
# so dbt-core and dbt-postgres come from requirements.txt; see the README for the measurements.
# The manifest lets Cosmos render the transform DAG without running dbt at parse time.
RUN dbt parse --project-dir /usr/local/airflow/dbt --profiles-dir /usr/local/airflow/dbt \
        --target-path /usr/local/airflow/dbt/target
