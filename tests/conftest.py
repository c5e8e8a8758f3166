"""Shared fixtures. Tests use real runtimes, real files and real servers; fakes implement our
own Protocols, never a library's."""
