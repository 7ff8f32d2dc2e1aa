"""Airflow operators of airflow-memsafe.

Importing them (a DAG file does, in the process that will run its tasks) sets up glibc's
malloc (:func:`~airflow_memsafe.memory.cleanup.configure_malloc`: one arena, a fixed mmap
threshold; a deployment's ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_`` win): doing it at
the first PBF read comes too late inside an Airflow task, whose runner has started threads
with arenas of their own by then.
"""

from airflow_memsafe.memory.cleanup import configure_malloc

configure_malloc()
