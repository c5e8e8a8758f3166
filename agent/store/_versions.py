"""Semantic-version precedence (semver.org, section 11) as a sort key."""

from __future__ import annotations

import re

__all__ = ["version_key"]

_CORE = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")

# One prerelease identifier: numeric ones sort before alphanumeric ones, numerically.
_Ident = tuple[int, int, str]
VersionKey = tuple[int, int, int, int, tuple[_Ident, ...], str]


def version_key(version: str) -> VersionKey:
    """Sort key for ``version``: ``1.0.0-rc.1 < 1.0.0 < 1.0.1 < 1.10.0``.

    Build metadata does not affect precedence; the full string breaks ties so that the order
    is total. Strings that are not semantic versions sort before every version.
    """
    match = _CORE.match(version)
    if match is None:
        return (-1, -1, -1, -1, (), version)
    major, minor, patch, pre = match.groups()
    idents: tuple[_Ident, ...] = ()
    if pre is not None:
        idents = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    # A release (no prerelease part) outranks every prerelease of the same core version.
    return (int(major), int(minor), int(patch), 0 if pre is not None else 1, idents, version)
