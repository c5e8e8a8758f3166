"""Fleet drift: a model version's live inputs and outputs, summed over devices and compared with
its reference profile or with another version's live distribution.

Agents count rows into the bundle's reference bins and counts merge by addition, so the fleet
sums them per scope (the whole fleet, a group, the devices of a wave) and computes PSI and
Jensen–Shannon from the sums. A record with a histogram whose number of bins is not the
profile's (an agent counting on other bins, a damaged row) is refused whole: logged once,
counted in the report, never summed.

Each version's bins come from its own reference data, so another version's counts are first
spread onto this version's bins — evenly within each of its bins, the under- and overflow
just outside its outer edges — before the two are compared.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fleet.errors import DriftUnavailableError, UnknownModelError
from fleet.store import Store
from fleet.store.drift import DriftRecord, HistogramKind, TelemetryReads
from protocol.drift import count, jensen_shannon, psi
from protocol.manifest import DriftProfile, FeatureBins

__all__ = [
    "FLEET",
    "Counts",
    "DriftReport",
    "FleetDrift",
    "HistogramDrift",
    "WaveDrift",
    "build_report",
    "compare",
    "group_scope",
    "rebin",
    "sum_counts",
]

log = logging.getLogger(__name__)

FLEET = "fleet"  # the scope of every device
_KINDS: tuple[HistogramKind, ...] = ("feature", "output")
BASELINE_LOOKBACK = timedelta(hours=1)  # the previous version's traffic before a wave started
_REFUSALS_REMEMBERED = 10_000  # refused records logged once each, the latest this many
_WAVES_REMEMBERED = 64  # waves whose last measurement is kept for reuse


def group_scope(group: str) -> str:
    return f"group:{group}"


class HistogramDrift(BaseModel):
    """One feature or output: its summed live counts against what they are compared with."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: HistogramKind
    rows: int = Field(description="rows counted into this histogram")
    psi: float | None = Field(description="population stability index; None: not comparable")
    js: float | None = Field(description="Jensen–Shannon divergence, base 2 (0-1)")
    counts: tuple[int, ...] = Field(description="the summed live counts, one per bin")
    reference: tuple[float, ...] = Field(description="what they are compared with, same bins")
    note: str | None = Field(default=None, description="why there is no PSI")


class DriftReport(BaseModel):
    """A version's live drift in one scope and time range, per feature and output."""

    model_config = ConfigDict(frozen=True)

    model: str
    version: str
    role: str
    scope: str = Field(description="'fleet', 'group:<name>' or '<n> devices'")
    against: str = Field(description="'reference' (the profile), or the version compared with")
    since: datetime
    until: datetime
    psi_warn: float
    psi_alert: float
    devices: int = Field(description="devices whose counts were summed")
    windows: int = Field(description="records summed (windows and hourly rollups)")
    rows: int = Field(description="rows those records counted")
    refused: int = Field(description="records refused: their bins do not match the profile")
    features: tuple[HistogramDrift, ...]
    outputs: tuple[HistogramDrift, ...]

    def histograms(self, kind: HistogramKind | None = None) -> tuple[HistogramDrift, ...]:
        if kind == "feature":
            return self.features
        if kind == "output":
            return self.outputs
        return self.features + self.outputs

    def worst(self, kind: HistogramKind | None = None) -> HistogramDrift | None:
        """The histogram with the highest PSI (None when none could be compared)."""
        compared = [h for h in self.histograms(kind) if h.psi is not None]
        return max(compared, key=lambda h: h.psi or 0.0) if compared else None


@dataclass
class Counts:
    """Counts summed over the records of one scope."""

    devices: set[str] = field(default_factory=set)
    windows: int = 0
    rows: int = 0
    refused: int = 0
    features: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    def of(self, kind: HistogramKind) -> dict[str, np.ndarray]:
        return self.features if kind == "feature" else self.outputs

    def add(self, other: Counts) -> None:
        """Add ``other``'s counts to these (the same profile's histograms)."""
        self.devices |= other.devices
        self.windows += other.windows
        self.rows += other.rows
        self.refused += other.refused
        for kind in _KINDS:
            mine = self.of(kind)
            for name, counts in other.of(kind).items():
                mine[name] = mine[name] + counts if name in mine else counts.copy()


def _bins(profile: DriftProfile, kind: HistogramKind) -> tuple[FeatureBins, ...]:
    return profile.features if kind == "feature" else profile.outputs


def _found(record: DriftRecord, kind: HistogramKind) -> dict[str, Any]:
    return record.features if kind == "feature" else record.outputs


class _Layout:
    """Where each histogram of a profile lies in one flat row of counts: features then outputs,
    each in the profile's order. Agents send histograms in that order, so most records become
    a row with a few calls into C rather than a Python step per histogram."""

    def __init__(self, profile: DriftProfile) -> None:
        self.names = {kind: [b.name for b in _bins(profile, kind)] for kind in _KINDS}
        self.bins = {kind: [len(b.counts) for b in _bins(profile, kind)] for kind in _KINDS}
        self.slices: list[tuple[HistogramKind, str, slice]] = []
        at = 0
        for kind in _KINDS:
            for name, bins in zip(self.names[kind], self.bins[kind], strict=True):
                self.slices.append((kind, name, slice(at, at + bins)))
                at += bins
        self.width = at

    def row(self, record: DriftRecord) -> list[Any] | str:
        """The record's histograms in order (zeros where it has none), or what is wrong."""
        parts: list[Any] = []
        for kind in _KINDS:
            found = _found(record, kind)
            if list(found) == self.names[kind]:
                values = list(found.values())
                try:
                    if list(map(len, values)) == self.bins[kind]:
                        parts += values
                        continue
                except TypeError:
                    pass  # a value without a length: named below
            for name, bins in zip(self.names[kind], self.bins[kind], strict=True):
                counts = found.get(name, [0] * bins)
                if not isinstance(counts, list):
                    return f"{kind} {name!r} holds no list of counts"
                if len(counts) != bins:
                    return f"{kind} {name!r} has {len(counts)} bins where the profile has {bins}"
                parts.append(counts)
        return parts

    def matrix(self, rows: Sequence[list[Any]]) -> tuple[np.ndarray, np.ndarray]:
        """The rows as one int64 matrix, and which rows hold something other than
        non-negative integers (ingest checked them; a damaged row may not)."""
        flat = itertools.chain.from_iterable(itertools.chain.from_iterable(rows))
        bad = np.zeros(len(rows), dtype=bool)
        try:
            matrix = np.fromiter(flat, dtype=np.int64, count=len(rows) * self.width)
            matrix = matrix.reshape(len(rows), self.width)
        except (TypeError, ValueError, OverflowError):
            matrix = np.zeros((len(rows), self.width), dtype=np.int64)
            for i, row in enumerate(rows):  # find the damaged rows, one at a time
                try:
                    matrix[i] = np.fromiter(itertools.chain.from_iterable(row), dtype=np.int64)
                except (TypeError, ValueError, OverflowError):
                    bad[i] = True
        return matrix, bad | (matrix < 0).any(axis=1)


def sum_counts(
    records: Iterable[DriftRecord],
    profile: DriftProfile,
    *,
    scopes: Callable[[DriftRecord], Sequence[str]] = lambda _: (FLEET,),
    refuse: Callable[[DriftRecord, str], None] = lambda *_: None,
) -> dict[str, Counts]:
    """Sum ``records`` per scope (``scopes`` says which scopes a record counts in: its
    device's groups, its time bucket ...).

    Histograms the profile does not name are ignored. A record with a histogram on another
    number of bins, or with counts that are not non-negative integers, is refused whole and
    told to ``refuse``. The records are summed in numpy, as one matrix.
    """
    layout = _Layout(profile)
    sums: dict[str, Counts] = {}
    candidates: list[DriftRecord] = []
    rows: list[list[Any]] = []

    def refused(record: DriftRecord, problem: str) -> None:
        refuse(record, problem)
        for scope in scopes(record):
            sums.setdefault(scope, Counts()).refused += 1

    for record in records:
        row = record.damaged or layout.row(record)
        if isinstance(row, str):
            refused(record, row)
        else:
            candidates.append(record)
            rows.append(row)
    matrix, bad = layout.matrix(rows)
    members: dict[str, list[int]] = {}
    for i, record in enumerate(candidates):
        if bad[i]:
            refused(record, "a count is not a non-negative integer")
            continue
        for scope in scopes(record):
            total = sums.setdefault(scope, Counts())
            total.devices.add(record.device_id)
            total.windows += 1
            total.rows += record.rows
            members.setdefault(scope, []).append(i)
    for scope, chosen in members.items():
        summed = (matrix if len(chosen) == len(candidates) else matrix[chosen]).sum(axis=0)
        for kind, name, where in layout.slices:
            sums[scope].of(kind)[name] = summed[where]
    return sums


def rebin(counts: np.ndarray, source: FeatureBins, target: FeatureBins) -> np.ndarray | None:
    """``counts`` on ``source``'s bins spread onto ``target``'s; None if the kinds differ.

    Categories map by name (unknown ones to the target's other-bin). Numeric counts spread
    evenly within each source interval; under- and overflow land just outside its outer edges.
    """
    values = np.asarray(counts, dtype=np.float64)
    if source.kind != target.kind:
        return None
    if source.kind == "categorical":
        out = np.zeros(len(target.categories) + 1)
        index = {c: i for i, c in enumerate(target.categories)}
        for i, category in enumerate(source.categories):
            out[index.get(category, len(target.categories))] += values[i]
        out[-1] += values[-1]
        return out
    if source.edges == target.edges:
        return values
    s = np.asarray(source.edges, dtype=np.float64)
    t = np.asarray(target.edges, dtype=np.float64)
    out = np.zeros(len(t) + 1)
    for edge, mass, away in ((s[0], values[0], -np.inf), (s[-1], values[-1], np.inf)):
        out[int(np.argmax(count(np.array([np.nextafter(edge, away)]), target)))] += mass
    inner = values[1:-1]
    # share of each source interval [a, b] lying below each target edge
    a, b = s[:-1], s[1:]
    below_share = np.clip((t[None, :] - a[:, None]) / (b - a)[:, None], 0.0, 1.0)
    below = (inner[:, None] * below_share).sum(axis=0)
    out[0] += below[0]
    out[1 : len(t)] += np.diff(below)
    out[len(t)] += inner.sum() - below[-1]
    return out


def _histogram(
    spec: FeatureBins,
    kind: HistogramKind,
    observed: np.ndarray | None,
    reference: np.ndarray | None,
    why_not: str,
) -> HistogramDrift:
    live = observed if observed is not None else np.zeros(len(spec.counts), np.int64)
    counts = tuple(int(c) for c in live)
    found = HistogramDrift(
        name=spec.name,
        kind=kind,
        rows=sum(counts),
        psi=None,
        js=None,
        counts=counts,
        reference=tuple(float(x) for x in reference) if reference is not None else (),
    )
    if found.rows == 0:
        return found.model_copy(update={"note": "no rows counted"})
    if reference is None:
        return found.model_copy(update={"note": why_not})
    if float(reference.sum()) <= 0:
        return found.model_copy(update={"note": "nothing to compare with: no counts there"})
    update = {"psi": psi(reference, live), "js": jensen_shannon(reference, live)}
    return found.model_copy(update=update)


def compare(
    counts: Counts,
    profile: DriftProfile,
    kind: HistogramKind,
    *,
    against: tuple[str, Counts, DriftProfile] | None = None,
) -> tuple[HistogramDrift, ...]:
    """Every ``kind`` histogram of ``counts`` against the profile's reference, or against
    another version's live counts (``(version, its counts, its profile)``)."""
    found = []
    for spec in _bins(profile, kind):
        reference: np.ndarray | None = np.asarray(spec.counts, dtype=np.float64)
        why_not = ""
        if against is not None:
            version, other, other_profile = against
            theirs = {b.name: b for b in _bins(other_profile, kind)}.get(spec.name)
            other_counts = other.of(kind).get(spec.name)
            if theirs is None:
                reference, why_not = None, f"{version} has no {kind} named {spec.name!r}"
            elif other_counts is None:
                reference, why_not = None, f"no rows of {version} counted"
            else:
                reference = rebin(other_counts, theirs, spec)
                why_not = f"{version} bins this {kind} as another kind (numeric or categorical)"
        found.append(_histogram(spec, kind, counts.of(kind).get(spec.name), reference, why_not))
    return tuple(found)


@dataclass(frozen=True)
class WaveDrift:
    """The new version on one wave's devices, and its predictions against the previous one's.

    ``report`` is None when the new version has no drift profile; ``against_previous`` when
    there is no previous version or too few of its rows (``previous_rows``) to compare with.
    """

    report: DriftReport | None
    previous: str | None = None
    against_previous: DriftReport | None = None
    previous_scope: str | None = None  # "the same devices" or "the fleet"
    previous_rows: int = 0


class FleetDrift:
    """Sums and compares drift counts from the fleet database.

    ``wave_reuse_s``: seconds a wave's measurement (:meth:`wave`) is reused before its windows
    are read again. The rollout engine asks at every tick while a wave waits on its gates, and
    a wave's windows since it started can be many; 0 reads them at every ask.
    """

    def __init__(self, store: Store, *, wave_reuse_s: float = 0.0) -> None:
        self._store = store
        self._reads = TelemetryReads(store.db)
        self._refused: OrderedDict[tuple[str, str, str, str], None] = OrderedDict()
        self._reuse = timedelta(seconds=wave_reuse_s)
        self._waves: OrderedDict[tuple[object, ...], tuple[datetime, WaveDrift]] = OrderedDict()

    def profile(self, model: str, version: str) -> DriftProfile:
        """The version's drift profile; :class:`DriftUnavailableError` if it has none."""
        profile = self._store.models.get(model, version).manifest.drift
        if profile is None:
            raise DriftUnavailableError(
                f"{model}@{version} has no drift profile, so its live counts have nothing to "
                "be compared with; export the model with reference data (`edgefleet export`) "
                "to give its bundle one"
            )
        return profile

    def sums(
        self,
        model: str,
        version: str,
        profile: DriftProfile,
        *,
        since: datetime,
        until: datetime,
        role: str = "primary",
        devices: Sequence[str] | None = None,
        group: str | None = None,
        by_group: bool = False,
        scopes: Callable[[DriftRecord], Sequence[str]] | None = None,
    ) -> dict[str, Counts]:
        """Counts of the version in [since, until): under ``FLEET`` (every device read, always
        there), and with ``by_group`` under ``group:<name>`` for each group of those devices;
        or under the scopes ``scopes`` gives each record."""
        records = self._reads.drift(
            model, version, since=since, until=until, role=role, devices=devices, group=group
        )
        if scopes is None:
            scopes = lambda _: (FLEET,)  # noqa: E731
        if by_group:
            scopes = self.group_scopes(records)
        sums = sum_counts(records, profile, scopes=scopes, refuse=self.refusals(model, version))
        sums.setdefault(FLEET, Counts())
        return sums

    def group_scopes(
        self, records: Sequence[DriftRecord]
    ) -> Callable[[DriftRecord], Sequence[str]]:
        """Where each of ``records`` counts: the fleet and each group of its device (as the
        device is labelled now)."""
        groups = self._reads.groups_of(sorted({r.device_id for r in records}))
        placed = {d: (FLEET, *(group_scope(g) for g in gs)) for d, gs in groups.items()}
        return lambda record: placed.get(record.device_id, (FLEET,))

    def refusals(self, model: str, version: str) -> Callable[[DriftRecord, str], None]:
        """What :func:`sum_counts` tells about a refused record: a warning, once per record."""

        def refuse(record: DriftRecord, problem: str) -> None:
            key = (model, version, record.device_id, record.record)
            if key in self._refused:
                return
            self._refused[key] = None
            if len(self._refused) > _REFUSALS_REMEMBERED:
                self._refused.popitem(last=False)
            log.warning(
                "drift counts refused",
                extra={
                    "model": model,
                    "version": version,
                    "device": record.device_id,
                    "record": record.record,
                    "detail": problem,
                },
            )

        return refuse

    def report(
        self,
        model: str,
        version: str,
        *,
        since: datetime,
        until: datetime,
        role: str = "primary",
        group: str | None = None,
        devices: Sequence[str] | None = None,
        against: str = "reference",
    ) -> DriftReport:
        """PSI and Jensen–Shannon of every feature and output of ``model``@``version`` in one
        scope (the fleet, one ``group`` or some ``devices``), against its reference profile or
        against version ``against``'s live counts in the same scope and range."""
        profile = self.profile(model, version)
        counts = self.sums(
            model, version, profile,
            since=since, until=until, role=role, devices=devices, group=group,
        )  # fmt: skip
        other: tuple[str, Counts, DriftProfile] | None = None
        if against != "reference":
            theirs = self.profile(model, against)
            other_counts = self.sums(
                model, against, theirs,
                since=since, until=until, role=role, devices=devices, group=group,
            )  # fmt: skip
            other = (against, other_counts[FLEET], theirs)
        scope = group_scope(group) if group is not None else FLEET
        if devices is not None:
            scope = f"{len(devices)} devices"
        return build_report(
            model, version, role, scope, since, until, profile, counts[FLEET], other
        )

    def wave(
        self,
        model: str,
        version: str,
        *,
        devices: Sequence[str],
        previous: str | None,
        since: datetime,
        until: datetime,
        min_rows: int,
    ) -> WaveDrift:
        """The new version on a wave's devices since the wave started, against its reference,
        and against ``previous``'s live counts on the same devices (or the fleet's where those
        devices have fewer than ``min_rows`` rows of it) from an hour before the wave.

        Measured at most once per ``wave_reuse_s`` (of ``until``) for the same wave: in between
        the last measurement is returned as it was."""
        key = (model, version, tuple(devices), previous, since, min_rows)
        last = self._waves.get(key)
        if last is not None and timedelta(0) <= until - last[0] < self._reuse:
            return last[1]
        measured = self._measure_wave(
            model, version, devices=devices, previous=previous, since=since, until=until,
            min_rows=min_rows,
        )  # fmt: skip
        if self._reuse > timedelta(0):
            self._waves[key] = (until, measured)
            self._waves.move_to_end(key)
            while len(self._waves) > _WAVES_REMEMBERED:
                self._waves.popitem(last=False)
        return measured

    def _measure_wave(
        self,
        model: str,
        version: str,
        *,
        devices: Sequence[str],
        previous: str | None,
        since: datetime,
        until: datetime,
        min_rows: int,
    ) -> WaveDrift:
        try:
            profile = self.profile(model, version)
        except DriftUnavailableError:
            return WaveDrift(report=None)
        scope = f"{len(devices)} devices"
        counts = self.sums(model, version, profile, since=since, until=until, devices=devices)
        report = build_report(
            model, version, "primary", scope, since, until, profile, counts[FLEET]
        )
        if previous is None or previous == version:
            return WaveDrift(report=report)
        try:
            theirs = self.profile(model, previous)
        except (DriftUnavailableError, UnknownModelError):
            return WaveDrift(report=report, previous=previous)
        needed = max(min_rows, 1)
        start = since - BASELINE_LOOKBACK
        baseline = Counts()
        for where, label in ((devices, "the same devices"), (None, "the fleet")):
            sums = self.sums(model, previous, theirs, since=start, until=until, devices=where)
            baseline = sums[FLEET]
            if baseline.rows >= needed:
                against = build_report(
                    model, version, "primary", scope, since, until, profile, counts[FLEET],
                    (previous, baseline, theirs),
                )  # fmt: skip
                return WaveDrift(report, previous, against, label, baseline.rows)
        return WaveDrift(report=report, previous=previous, previous_rows=baseline.rows)


def build_report(
    model: str,
    version: str,
    role: str,
    scope: str,
    since: datetime,
    until: datetime,
    profile: DriftProfile,
    counts: Counts,
    other: tuple[str, Counts, DriftProfile] | None = None,
) -> DriftReport:
    return DriftReport(
        model=model,
        version=version,
        role=role,
        scope=scope,
        against=other[0] if other is not None else "reference",
        since=since,
        until=until,
        psi_warn=profile.psi_warn,
        psi_alert=profile.psi_alert,
        devices=len(counts.devices),
        windows=counts.windows,
        rows=counts.rows,
        refused=counts.refused,
        features=compare(counts, profile, "feature", against=other),
        outputs=compare(counts, profile, "output", against=other),
    )
