"""The per-type loop of the extract operators: read, write and commit, free memory, next type.

One loop for both operators: the one-region operator and the many-regions operator differ
only in the :class:`RowTarget` they hand it (what one read computes, and the rows a type's
outcome becomes). The loop owns the isolation (a type that fails fails alone), the cleanup
between types, the memory watch and its snapshots, and the log lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.errors import InvalidPbfError, is_permanent
from airflow_memsafe.features import FeatureType
from airflow_memsafe.hooks import FactsDatabaseError, OsmFactsHook
from airflow_memsafe.memory import memory_monitor, release_memory
from airflow_memsafe.memory.monitor import MemoryMonitor, MemorySample
from airflow_memsafe.memory.slots import concurrency_slot
from airflow_memsafe.model import FactRow, Lineage
from airflow_memsafe.osm.source import PbfSource

__all__ = ["LoopOutcome", "RowKey", "RowTarget", "TypeLoop"]


@dataclass(frozen=True)
class RowKey:
    """The key and lineage the rows of a task carry."""

    region_id: str
    snapshot: str
    lineage: Lineage


class RowTarget(Protocol):
    """Where the rows of a type come from and go: one region, or many."""

    def read(
        self,
        source: PbfSource,
        types: list[FeatureType],
        settings: MemsafeSettings,
        monitor: MemoryMonitor,
    ) -> tuple[Mapping[str, Any], Mapping[str, BaseException]]:
        """One read of ``source`` for ``types``: each type's outcome, and the exception of
        each type that failed alone."""
        ...

    def rows(self, ft: FeatureType, outcome: Any, key: RowKey) -> tuple[list[FactRow], Any, str]:
        """The rows of one type's outcome, its XCom count, and a log summary."""
        ...


@dataclass
class LoopOutcome:
    """What a task did: counts by type (XCom), failures (type → one-line error), the failed
    types a retry could fix, and the types whose rows had landed already (not recomputed)."""

    counts: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    retryable: set[str] = field(default_factory=set)
    resumed: list[str] = field(default_factory=list)


class TypeLoop:
    """A task's feature types, one read at a time, each type's rows committed on its own.

    Used as a context manager: it takes a concurrency slot, runs the memory monitor, and on
    exit closes the hook's connection and writes the last memory snapshots. Memory: one read's
    working set at a time (the engine's, see :func:`~airflow_memsafe.osm.extract.
    extract_pass`), released (``force_gc``) before the next read.

    :param hook: the facts database.
    :param settings: the engine settings of the task.
    :param log: the operator's logger.
    :param snapshot_ids: ``dag_id``, ``run_id``, ``task_id`` of the memory snapshots written
        to ``pipeline_metrics``; None writes none.
    """

    def __init__(
        self,
        hook: OsmFactsHook,
        settings: MemsafeSettings,
        log: logging.Logger | Any,
        *,
        snapshot_ids: Mapping[str, str | None] | None = None,
    ) -> None:
        self.hook = hook
        self.settings = settings
        self.log = log
        self.monitor = memory_monitor(settings)
        self.snapshots = None
        if snapshot_ids is not None:
            self.snapshots = hook.memory_snapshot_writer(**snapshot_ids)
            self.snapshots.held = True  # until the task's own connection worked
            self.monitor.register_sample_callback(self.snapshots.on_sample)
        self.monitor.register_warning_callback(self._log_pressure)
        self.monitor.register_critical_callback(self._log_pressure)
        self._stack = ExitStack()

    def __enter__(self) -> TypeLoop:
        with ExitStack() as stack:
            if self.snapshots is not None:
                stack.callback(self.snapshots.close)  # last: after the connection closed
            stack.enter_context(
                concurrency_slot(self.settings.max_concurrency, lock_dir=self.settings.slots_dir)
            )
            stack.enter_context(self.monitor)
            stack.callback(self.hook.close)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.__exit__(*exc_info)

    def connect(self) -> None:
        """Open the task's connection; memory snapshots are written from now on."""
        self.hook.live_connection()
        if self.snapshots is not None:
            self.snapshots.held = False

    def run(
        self,
        types: list[FeatureType],
        source: PbfSource,
        target: RowTarget,
        key: RowKey,
        landed: Mapping[str, int],
        single_pass: bool,
    ) -> LoopOutcome:
        """Read (one read per type, or one for all with ``single_pass``), then per type:
        write and commit its rows, free memory. Failures are isolated per type. Types in
        ``landed`` (rows from the same input file) are not recomputed.

        A broken file or an unreachable database fails every later type at once, without
        reading the PBF again (the database is checked with a cheap query before each read).
        """
        done = LoopOutcome()
        pending = []
        for ft in types:
            if ft.name in landed:
                done.counts[ft.name] = landed[ft.name]
                done.resumed.append(ft.name)
                self.log.info(
                    "skipping %s: row already landed for this snapshot and source hash "
                    "(%d features; reprocess=True recomputes it)",
                    ft.name,
                    landed[ft.name],
                )
            else:
                pending.append(ft)
        done.resumed.sort()
        groups = [pending] if single_pass and pending else [[ft] for ft in pending]
        fatal: str | None = None  # why no later type can succeed in this attempt
        for i, group in enumerate(groups):
            if fatal is None:
                try:
                    self.hook.live_connection()
                except FactsDatabaseError as exc:
                    fatal = f"{type(exc).__name__}: {exc}"
                    done.retryable.update(ft.name for g in groups[i:] for ft in g)
            if fatal is not None:
                for ft in group:
                    done.failed[ft.name] = fatal
                    self.log.error("%s not attempted: %s", ft.name, fatal)
                continue
            fatal = self._run_group(group, source, target, key, done)
        return done

    def _run_group(
        self,
        group: list[FeatureType],
        source: PbfSource,
        target: RowTarget,
        key: RowKey,
        done: LoopOutcome,
    ) -> str | None:
        """One read for ``group``, then each type's write; returns the error that makes
        later reads pointless (a corrupt file), else None."""
        monitor, snapshots = self.monitor, self.snapshots
        names = [ft.name for ft in group]
        label = names[0] if len(group) == 1 else "single_pass"
        started = time.perf_counter()
        fatal: str | None = None
        with monitor.labelled("extract", label):
            before = monitor.sample()
            if snapshots is not None:
                snapshots.record(before, "type_start")
            try:
                outcomes, errors = target.read(source, group, self.settings, monitor)
            except Exception as exc:  # the whole read failed: every type of it
                outcomes, errors = {}, dict.fromkeys(names, exc)
                if isinstance(exc, InvalidPbfError):  # every later read would fail alike
                    fatal = f"{type(exc).__name__}: {exc}"
            read_s = time.perf_counter() - started
            written: dict[str, str] = {}
            for ft in group:
                error = errors.get(ft.name)
                if error is None:
                    try:
                        with monitor.labelled("write", ft.name):
                            rows, count, summary = target.rows(ft, outcomes[ft.name], key)
                            self.hook.write_rows(rows)
                        done.counts[ft.name], written[ft.name] = count, summary
                    except Exception as exc:  # one type's failure must not stop the others
                        error = exc
                if error is not None:
                    done.failed[ft.name] = f"{type(error).__name__}: {error}"
                    if not is_permanent(error):
                        done.retryable.add(ft.name)
                    self.log.error("%s failed after %.1f s: %s", ft.name, read_s, error)
            outcomes = errors = {}  # free the results before measuring what is left
            peak_mb = monitor.peak_working_set_mb
            with monitor.labelled("cleanup"):
                if self.settings.force_gc:
                    release_memory()
                after = monitor.sample()
            if snapshots is not None:
                snapshots.record(after, "type_end")
                snapshots.flush()
        shared = f" (one read for {', '.join(names)})" if len(group) > 1 else ""
        for name, summary in written.items():
            self.log.info(
                "%s: read %.2f s%s (the row's duration_s), %s; %.2f s in all with writes and "
                "cleanup, working set before %.0f / peak %.0f / after %.0f MB (freed %.0f MB) "
                "— row committed",
                name,
                read_s,
                shared,
                summary,
                time.perf_counter() - started,
                before.working_set_mb,
                peak_mb,
                after.working_set_mb,
                max(0.0, peak_mb - after.working_set_mb),
            )
        return fatal

    def _log_pressure(self, sample: MemorySample) -> None:
        self.log.warning(
            "Memory %s: working set %.0f MB = %.0f%% of %.0f MB (%s %s)",
            sample.level.name,
            sample.working_set_mb,
            sample.percent,
            sample.limit_mb,
            sample.stage,
            sample.operation,
        )
