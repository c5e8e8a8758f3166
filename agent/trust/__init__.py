"""The agent's side of trust: the signed model catalogue (TUF) and verified bundle downloads.

The downloader is ``agent.trust.download.download`` (not re-exported here: the function would
hide its module of the same name).
"""

from agent.trust.errors import TrustError
from agent.trust.tuf_client import ModelCatalogue, TargetInfo

__all__ = ["ModelCatalogue", "TargetInfo", "TrustError"]
