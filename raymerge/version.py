"""raymerge's own version, as installed (for `--version`, model cards and the resume job identity)."""

from __future__ import annotations


def installed_version() -> str:
    """The installed raymerge's version ("dev" when running from a source tree without metadata)."""
    try:
        from importlib.metadata import version

        return version("raymerge")
    except Exception:  # noqa: BLE001 - not installed
        return "dev"
