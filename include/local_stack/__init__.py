"""Run the whole project on one machine without Docker: embedded PostgreSQL plus a real Airflow."""
