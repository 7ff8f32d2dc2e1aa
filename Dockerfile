# airflow-memsafe on the official Airflow image (the image docker-compose.yaml builds).
#
#   docker build -t airflow-memsafe:latest .
#
# The FROM tag must match the apache-airflow pin in constraints-py311.txt
# (tests/deploy/test_compose_static.py checks it).
FROM apache/airflow:3.3.2-python3.11

# Directories the compose file mounts or points settings at. Group 0 + g+rwX as the official
# image does, so any AIRFLOW_UID (always run with gid 0) can write them. The empty scratch
# folder seeds the `memsafe-scratch` named volume with these permissions.
USER root
RUN mkdir -p /opt/airflow/data /opt/airflow/scratch /opt/airflow-memsafe \
    && chown -R airflow:0 /opt/airflow/data /opt/airflow/scratch /opt/airflow-memsafe \
    && chmod -R g+rwX /opt/airflow/data /opt/airflow/scratch /opt/airflow-memsafe

# Official image convention: install as the airflow user and pin apache-airflow to the image's
# version so pip can never up- or downgrade Airflow itself. The constraints file pins the rest
# (osmium, shapely, pyproj, the postgres provider...) to the versions the test suite ran with.
USER airflow
WORKDIR /opt/airflow-memsafe
COPY --chown=airflow:0 pyproject.toml README.md constraints-py311.txt ./
COPY --chown=airflow:0 airflow_memsafe/ ./airflow_memsafe/
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" \
        -c constraints-py311.txt . \
    && python -c "import airflow_memsafe, osmium, shapely, pyproj" \
    && rm -rf build *.egg-info

# The example DAGs, baked in; docker-compose.yaml mounts ./dags over them (and ./data, for
# your PBF files, at /opt/airflow/data). Their default input is the Monaco sample installed
# with the package (airflow_memsafe/samples), so no data needs copying into the image.
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
WORKDIR /opt/airflow
