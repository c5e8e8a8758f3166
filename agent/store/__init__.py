"""The on-disk model store: crash-safe install and activation of bundles, a pinned fallback."""

from agent.store._layout import DIGEST_NAME, InstalledModel
from agent.store._store import ModelStore
from agent.store._versions import version_key

__all__ = ["DIGEST_NAME", "InstalledModel", "ModelStore", "version_key"]
