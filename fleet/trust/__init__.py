"""The fleet's side of trust: the TUF image repository, its keys, and serving it over HTTP."""

from fleet.trust.http import trust_app
from fleet.trust.keys import ONLINE_ROLES, ROLES, KeyRef, generate_key, load_signer, public_key
from fleet.trust.repository import DEFAULT_EXPIRY, ImageRepository, TargetInfo

__all__ = [
    "DEFAULT_EXPIRY",
    "ONLINE_ROLES",
    "ROLES",
    "ImageRepository",
    "KeyRef",
    "TargetInfo",
    "generate_key",
    "load_signer",
    "public_key",
    "trust_app",
]
