"""Airflow operators of airflow-memsafe.

Importing them (a DAG file does, in the process that will run its tasks) caps glibc's
malloc arenas (:func:`~airflow_memsafe.memory.cleanup.cap_malloc_arenas`; a deployment's
``MALLOC_ARENA_MAX`` wins): capping at the first PBF read comes too late inside an Airflow
task, whose runner has started threads with arenas of their own by then.
"""

from airflow_memsafe.memory.cleanup import cap_malloc_arenas

cap_malloc_arenas()
