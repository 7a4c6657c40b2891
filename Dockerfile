# Astro Runtime 3.3 (Airflow 3.3). Its ONBUILD steps install packages.txt and requirements.txt and
# copy this project to /usr/local/airflow; the lines below run after them.
FROM astrocrpublic.azurecr.io/runtime:3.3-2

# No usage telemetry: deployments behind a firewall would log a failed call on every task.
ENV AIRFLOW__COSMOS__ENABLE_TELEMETRY=False \
    AIRFLOW__USAGE_DATA_COLLECTION__ENABLED=False

# The dbt build's producer task writes each node's result once (XCom), not also into an Airflow
# Variable rewritten whole on every result; the backup is still written when the producer fails.
ENV AIRFLOW__COSMOS__ENABLE_WATCHER_RELIABLE_RETRY=False

# dbt runs inside the Airflow worker through dbt's Python API (Cosmos InvocationMode.DBT_RUNNER),
# so dbt-core and dbt-postgres come from requirements.txt; see the README for the measurements.
# config/airflow_local_settings.py lands in $AIRFLOW_HOME/config, where Airflow imports it: the
# scheduler (and a Celery worker) imports dbt and parses the DAGs once before forking task processes.
# The manifest lets Cosmos render the transform DAG without running dbt at parse time. Parsed with
# the profile include/dbt_project.py generates for airflow_settings.yaml's warehouse connection,
# the one Cosmos builds in every task, so each dbt task can reuse this parse (dbt keeps it only
# when profile, target and address match). DBT_PROJECT_DIR picks another dbt project than dbt/.
RUN python -m include.dbt_project manifest

# dbt docs: the dbt_docs DAG's task publishes into this folder and Cosmos' plugin (Airflow
# 3.1+) serves it under Browse > dbt Docs, keyed by the dbt project's name read from the manifest
# just built (written into airflow.cfg: an ENV line cannot read the manifest). `astro dev start`
# mounts include/ into every container, so the task (scheduler container) and the api-server see
# the same folder. On Astro Cloud the workers and the api-server share no disk: point "dir" at
# object storage instead, e.g. {"<project>": {"dir": "s3://bucket/dbt_docs", "conn_id":
# "aws_default"}}, as the Deployment variable AIRFLOW__COSMOS__DBT_DOCS_PROJECTS (it wins over
# airflow.cfg); the task writes there through Airflow's ObjectStoragePath.
RUN printf '\n[cosmos]\ndbt_docs_projects = %s\n' \
        "$(python -m include.dbt_project docs-setting --docs-dir /usr/local/airflow/include/dbt_docs)" \
        >> "${AIRFLOW_HOME:-/usr/local/airflow}/airflow.cfg"
