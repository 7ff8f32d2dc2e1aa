"""Memory accounting (container-aware) and release between feature types."""

from airflow_memsafe.memory.cgroup import MemoryReading, read_memory
from airflow_memsafe.memory.cleanup import release_memory
from airflow_memsafe.memory.process import PeakRss

__all__ = ["MemoryReading", "PeakRss", "read_memory", "release_memory"]
