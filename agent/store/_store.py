"""The on-disk model store: installed bundles, the active version of each model, pins.

Layout below ``state_dir``::

    models/<name>/<version>/                 an extracted bundle (manifest.json + model files)
    models/<name>/<version>/.bundle-sha256   digest of the bundle it came from
    models/<name>/active                     pointer: {"version", "previous", "activated"}
    pins.json                                pinned name@version pairs, never collected
    journal.jsonl                            one fsynced line per step begun and finished
    staging/                                 work in progress; emptied whenever the store opens

Every change becomes visible through one rename (a staged version folder into ``models/``, a
temporary pointer or pins file over the old one), and journal lines bracket it. Opening the
store settles any step that a crash left open, so the last committed version stays active.
One process at a time owns a state directory; threads within it may share one store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Literal

from agent.errors import StoreError
from agent.files import atomic_write, fsync_dir
from agent.store._files import remove_tree
from agent.store._journal import Journal
from agent.store._layout import (
    DIGEST_NAME,
    POINTER_NAME,
    InstalledModel,
    StoreLayout,
    check_name,
    check_ref,
    os_error,
)
from agent.store._records import JournalRecord, Op, Pins, Pointer, utc_now
from agent.store._versions import version_key
from protocol.bundle import extract_bundle, file_digest, read_manifest
from protocol.errors import ProtocolError

__all__ = ["ModelStore"]

log = logging.getLogger(__name__)

_HISTORY = 8  # versions a pointer remembers at least, beyond those kept on disk
Outcome = Literal["committed", "rolled_back"]


class ModelStore:
    """Installs bundles, activates versions with an atomic pointer swap, keeps a fallback.

    ``keep_previous`` versions that were active before the current one stay on disk as
    rollback targets; ``journal_limit`` bounds the journal, in records.
    """

    def __init__(
        self, state_dir: Path, *, keep_previous: int = 2, journal_limit: int = 1000
    ) -> None:
        if keep_previous < 0:
            raise StoreError(f"keep_previous must be 0 or more, not {keep_previous}")
        if journal_limit < 16:
            raise StoreError(f"journal_limit must be at least 16 records, not {journal_limit}")
        self.state_dir = Path(state_dir)
        self.keep_previous = keep_previous
        self._layout = StoreLayout(self.state_dir)
        self._lock = threading.RLock()
        self._cache: dict[tuple[str, str], InstalledModel] = {}
        folder = self.state_dir
        try:
            for folder in (self.state_dir, self._layout.models, self._layout.staging):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error("create", folder, e) from e
        self._journal = Journal(self._layout.journal_path, limit=journal_limit)
        with self._lock:
            self._recover()

    # -- reading -------------------------------------------------------------------------------

    def get(self, name: str, version: str) -> InstalledModel:
        """The installed ``name@version``; :class:`StoreError` when it is not installed."""
        check_ref(name, version)
        with self._lock:
            digest = self._layout.installed_digest(name, version)
            if digest is None:
                raise StoreError(
                    f"{name}@{version} is not installed in {self._layout.models}; install its "
                    "bundle first"
                )
            cached = self._cache.get((name, version))
            if cached is not None and cached.bundle_sha256 == digest:
                return cached
            model = self._layout.load(name, version, digest)
            self._cache[(name, version)] = model
            return model

    def verify(self, name: str, version: str) -> InstalledModel:
        """:meth:`get`, then check every file's size and sha256 against the manifest."""
        model = self.get(name, version)
        self._layout.verify_files(model)
        return model

    def versions(self, name: str) -> list[str]:
        """Installed versions of ``name``, in semantic-version order (oldest first)."""
        check_name(name)
        return self._layout.versions(name)

    def names(self) -> list[str]:
        """Models with at least one installed version, sorted."""
        return [n for n in self._layout.model_folders() if self._layout.versions(n)]

    def active(self, name: str) -> InstalledModel | None:
        """The active version of ``name``, or None when none was ever activated."""
        check_name(name)
        with self._lock:
            pointer = self._pointer(name)
            return None if pointer is None else self.get(name, pointer.version)

    def previous(self, name: str) -> InstalledModel | None:
        """The most recent version active before the current one that is still installed."""
        check_name(name)
        with self._lock:
            pointer = self._pointer(name)
            for version in pointer.previous if pointer else ():
                if self._layout.installed_digest(name, version) is not None:
                    return self.get(name, version)
            return None

    def pinned(self) -> set[tuple[str, str]]:
        """Pinned ``(name, version)`` pairs."""
        with self._lock:
            return self._pins().pairs()

    # -- install -------------------------------------------------------------------------------

    def install(self, bundle: Path) -> InstalledModel:
        """Verify and install a bundle file; it is not activated.

        Installing the same bundle again returns the installed version. A different bundle
        with the same name and version is refused: versions are immutable.
        """
        bundle = Path(bundle)
        try:
            digest = file_digest(bundle)
            manifest = read_manifest(bundle)
        except OSError as e:
            raise os_error("read bundle", bundle, e) from e
        except ProtocolError as e:
            raise StoreError(f"bundle {bundle} was refused: {e}") from e
        name, version = manifest.name, manifest.version
        with self._lock:
            existing = self._layout.installed_digest(name, version)
            if existing == digest:
                return self.get(name, version)
            if existing is not None:
                raise StoreError(
                    f"{name}@{version} is already installed from a different bundle "
                    f"(sha256 {existing}; {bundle.name} has {digest}); versions are immutable: "
                    "publish the change under a new version"
                )
            step = self._begin("install", name, version, bundle_sha256=digest)
            work = self._layout.staging / step.id
            try:
                self._stage_and_move(bundle, work, name, version, digest)
            except (OSError, ProtocolError, StoreError) as e:
                with contextlib.suppress(OSError):
                    remove_tree(work)
                self._fail(step, e)
                if isinstance(e, OSError):
                    raise os_error(f"install {name}@{version} from", bundle, e) from e
                if isinstance(e, ProtocolError):
                    raise StoreError(f"bundle {bundle} was refused: {e}") from e
                raise
            self._done(step, "committed")
            with contextlib.suppress(OSError):
                remove_tree(work)
        return self.get(name, version)

    def _stage_and_move(
        self, bundle: Path, work: Path, name: str, version: str, digest: str
    ) -> None:
        """Extract into staging, then move the finished folder into ``models/`` in one rename."""
        work.mkdir()
        staged = work / version
        extracted = extract_bundle(bundle, staged)
        if (extracted.name, extracted.version) != (name, version):
            raise StoreError(
                f"bundle {bundle} changed while it was installed ({name}@{version} became "
                f"{extracted.name}@{extracted.version}); install it again"
            )
        atomic_write(staged / DIGEST_NAME, f"{digest}\n".encode())
        model_dir = self._layout.models / name
        if not model_dir.is_dir():
            model_dir.mkdir()
            fsync_dir(self._layout.models)
        os.rename(staged, self._layout.version_dir(name, version))
        fsync_dir(model_dir)

    # -- activate ------------------------------------------------------------------------------

    def activate(self, name: str, version: str) -> None:
        """Make ``name@version`` the active version, remembering the one it replaces.

        The pointer is swapped with one rename. Old versions beyond ``keep_previous`` are then
        removed; a failure there is logged, as the activation itself has committed.
        """
        with self._lock:
            self.get(name, version)
            current = self._pointer(name)
            if current is not None and current.version == version:
                return
            history: tuple[str, ...] = ()
            if current is not None:
                rest = (v for v in current.previous if v not in (version, current.version))
                history = (current.version, *rest)
            history = history[: max(self.keep_previous, _HISTORY)]
            self._swap_pointer(name, version, history, current.version if current else None)
            # The activation has committed: a failure to collect old versions must not undo it.
            self._gc_logged(name)

    def _swap_pointer(
        self,
        name: str,
        version: str,
        history: tuple[str, ...],
        replaces: str | None,
        *,
        reason: str | None = None,
    ) -> Pointer:
        pointer = Pointer(version=version, previous=history, activated=utc_now())
        step = self._begin("activate", name, version, replaces=replaces, previous=history)
        path = self._layout.pointer_path(name)
        try:
            atomic_write(path, pointer.to_json())
        except OSError as e:
            self._fail(step, e)
            raise os_error(f"activate {name}@{version}: write", path, e) from e
        self._done(step, "committed", reason=reason)
        return pointer

    # -- pins ----------------------------------------------------------------------------------

    def pin(self, name: str, version: str) -> None:
        """Keep ``name@version`` whatever the retention policy says (the fallback model)."""
        with self._lock:
            self.get(name, version)
            pins = self._pins().pairs()
            if (name, version) not in pins:
                self._write_pins("pin", name, version, pins | {(name, version)})

    def unpin(self, name: str, version: str) -> None:
        """Let ``name@version`` be garbage-collected again; unpinning twice is not an error."""
        check_ref(name, version)
        with self._lock:
            pins = self._pins().pairs()
            if (name, version) in pins:
                self._write_pins("unpin", name, version, pins - {(name, version)})

    def _write_pins(
        self, op: Literal["pin", "unpin"], name: str, version: str, pins: set[tuple[str, str]]
    ) -> None:
        step = self._begin(op, name, version)
        try:
            atomic_write(self._layout.pins_path, Pins.of(pins).to_json())
        except OSError as e:
            self._fail(step, e)
            raise os_error(f"{op} {name}@{version}: write", self._layout.pins_path, e) from e
        self._done(step, "committed")

    def _pins(self) -> Pins:
        pins = self._layout.read_pins()
        if pins is not None:
            return pins
        # Losing a pin could let the fallback model be collected: rebuild from the journal.
        pairs = {(n, v) for n, v in self._journal.pins() if self._layout.installed_digest(n, v)}
        path = self._layout.pins_path
        log.warning(
            "%s is damaged; rebuilt it from the journal with %d pin(s): %s",
            path,
            len(pairs),
            ", ".join(f"{n}@{v}" for n, v in sorted(pairs)) or "none",
        )
        try:
            atomic_write(path, Pins.of(pairs).to_json())
        except OSError as e:
            raise os_error("rewrite", path, e) from e
        return Pins.of(pairs)

    # -- garbage collection --------------------------------------------------------------------

    def gc(self) -> list[tuple[str, str]]:
        """Remove versions no longer needed; returns the ``(name, version)`` pairs removed.

        Kept: the active version, the last ``keep_previous`` previous ones, pinned ones, and
        versions newer than the active one that were never active (updates waiting to be
        activated). A model that was never activated keeps everything.
        """
        with self._lock:
            removed: list[tuple[str, str]] = []
            for name in self.names():
                removed.extend(self._gc_model(name))
            return removed

    def _gc_model(self, name: str) -> list[tuple[str, str]]:
        pointer = self._pointer(name)
        if pointer is None:
            return []
        keep = {pointer.version, *pointer.previous[: self.keep_previous]}
        keep |= {v for n, v in self._pins().pairs() if n == name}
        active_key = version_key(pointer.version)
        removed = []
        for version in self._layout.versions(name):
            if version in keep:
                continue
            if version not in pointer.previous and version_key(version) > active_key:
                continue
            self._remove_version(name, version)
            removed.append((name, version))
        return removed

    def _gc_logged(self, name: str) -> None:
        try:
            self._gc_model(name)
        except StoreError as e:
            log.warning("model %s: removing old versions failed: %s", name, e)

    def _remove_version(self, name: str, version: str) -> None:
        """Move the version out of ``models/`` in one rename, then delete it from staging."""
        step = self._begin("gc", name, version)
        source = self._layout.version_dir(name, version)
        trash = self._layout.staging / step.id
        try:
            os.rename(source, trash)
            fsync_dir(source.parent)
        except OSError as e:
            self._fail(step, e)
            raise os_error(f"remove {name}@{version}: move", source, e) from e
        self._cache.pop((name, version), None)
        self._done(step, "committed")
        try:
            remove_tree(trash)
        except OSError as e:
            log.warning("could not delete %s (it goes on the next start): %s", trash, e)

    # -- journal -------------------------------------------------------------------------------

    def _begin(self, op: Op, name: str, version: str, **fields: Any) -> JournalRecord:
        record = JournalRecord(
            op=op, state="begin", id=os.urandom(8).hex(), name=name, version=version, **fields
        )
        self._journal.append(record)
        return record

    def _done(self, step: JournalRecord, outcome: Outcome, *, reason: str | None = None) -> None:
        # The done record repeats the step's fields so that compaction may drop the begin.
        carried = step.model_dump(exclude={"state", "at", "outcome", "reason"})
        self._journal.append(JournalRecord(state="done", outcome=outcome, reason=reason, **carried))

    def _fail(self, step: JournalRecord, error: BaseException) -> None:
        try:
            self._done(step, "rolled_back", reason=str(error))
        except StoreError as e:
            # The step stays open and is settled when the store next opens; the error that
            # stopped the step is the one to report.
            log.warning("could not journal the rollback of %s %s: %s", step.op, step.name, e)

    # -- pointer -------------------------------------------------------------------------------

    def _pointer(self, name: str) -> Pointer | None:
        pointer, problem = self._layout.read_pointer(name)
        if pointer is not None and problem is None:
            try:
                self.get(name, pointer.version)
            except StoreError as e:
                problem = f"the version it names is damaged ({e})"
        if problem is None:
            return pointer
        return self._repair_pointer(name, pointer, problem)

    def _repair_pointer(self, name: str, damaged: Pointer | None, problem: str) -> Pointer | None:
        """Point ``name`` at the last committed version still intact, or the newest intact one."""
        path = self._layout.pointer_path(name)
        log.warning("model %s: the active pointer %s is damaged: %s", name, path, problem)
        last = self._journal.last_activation(name)
        candidates: list[tuple[str, tuple[str, ...], str]] = []
        if last is not None:
            candidates.append((last.version, last.previous or (), "the journal"))
        history = [*(damaged.previous if damaged else ()), *((last.previous or ()) if last else ())]
        candidates += [(v, (), "the pointer's history") for v in history]
        newest = reversed(self._layout.versions(name))
        candidates += [(v, (), "the newest intact version") for v in newest]
        for version, previous, source in candidates:
            if not self._intact(name, version):
                continue
            kept = tuple(
                v for v in previous if v != version and self._layout.installed_digest(name, v)
            )
            pointer = self._swap_pointer(
                name, version, kept, None, reason=f"pointer recovered from {source}: {problem}"
            )
            log.warning("model %s: %s@%s is active again (from %s)", name, name, version, source)
            return pointer
        log.warning("model %s: no intact version is installed; no version is active", name)
        try:
            os.replace(path, path.with_name(f"{POINTER_NAME}.damaged"))
            fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise os_error("set aside the damaged pointer", path, e) from e
        return None

    def _intact(self, name: str, version: str) -> bool:
        try:
            self.verify(name, version)
        except StoreError as e:
            log.warning("%s@%s is not intact: %s", name, version, e)
            return False
        return True

    # -- recovery ------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Settle the steps a crash left open, clear staging, repair damaged pointers and pins."""
        unfinished_gc: set[str] = set()
        for step in self._journal.open_steps():
            if step.op == "gc":
                unfinished_gc.add(step.name)
            outcome: Outcome = "committed" if self._step_committed(step) else "rolled_back"
            log.warning(
                "settling the interrupted %s of %s@%s as %s",
                step.op,
                step.name,
                step.version,
                outcome,
            )
            self._done(step, outcome, reason="settled on open after an interruption")
        for path in self._layout.leftovers():
            log.warning("removing %s, left by an interrupted step", path)
            try:
                remove_tree(path)
            except OSError as e:
                raise os_error("remove leftover", path, e) from e
        for name in self._layout.model_folders():
            self._pointer(name)
        self._pins()
        # An interrupted collection is run again rather than left for the next activation.
        for name in sorted(unfinished_gc):
            self._gc_logged(name)

    def _step_committed(self, step: JournalRecord) -> bool:
        """Whether the one rename that commits ``step`` happened before the interruption."""
        name, version = step.name, step.version
        if step.op == "install":
            try:
                return self._layout.installed_digest(name, version) == step.bundle_sha256
            except StoreError:
                return False
        if step.op == "activate":
            pointer, _problem = self._layout.read_pointer(name)
            return pointer is not None and pointer.version == version
        if step.op == "gc":
            return not self._layout.version_dir(name, version).exists()
        pins = self._layout.read_pins()
        pinned = pins is not None and (name, version) in pins.pairs()
        return pinned == (step.op == "pin")
