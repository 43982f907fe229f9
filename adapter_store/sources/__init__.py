"""Where adapters come from: one interface (base.py), four kinds of implementations."""

from adapter_store.sources.base import AdapterSource, DownloadTarget, Fetched, Resolver

__all__ = ["AdapterSource", "DownloadTarget", "Fetched", "Resolver"]
