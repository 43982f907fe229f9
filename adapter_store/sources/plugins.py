"""Custom resolvers from installed packages, found through the entry-point group `loraserve.adapter_resolvers`.

A plugin package declares, in its pyproject.toml:

    [project.entry-points."loraserve.adapter_resolvers"]
    myname = "my_package.module:make_resolver"

`make_resolver(context: PluginContext) -> Resolver` is called once at start-up. Only the plugins named in
LORASERVE_STORE_PLUGINS are loaded (installing a package is not consent to run it); "*" loads every one.
README.md "Resolver plugins" has the whole contract; tests/store/example_plugin is a working example.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass, field

from adapter_store.sources.base import Resolver

ENTRY_POINT_GROUP = "loraserve.adapter_resolvers"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PluginContext:
    """What a plugin factory gets: its entry-point name and its options (LORASERVE_STORE_PLUGIN_OPTIONS[name])."""

    name: str
    options: dict = field(default_factory=dict)


def installed() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_plugins(names: tuple[str, ...], options: dict[str, dict]) -> dict[str, Resolver]:
    """name -> Resolver for each plugin named ("*": all installed); ValueError naming a missing or bad one."""
    available = installed()
    wanted = sorted(available) if names == ("*",) else list(names)
    out = {}
    for name in wanted:
        ep = available.get(name)
        if ep is None:
            raise ValueError(f"resolver plugin {name!r} is not installed (entry-point group {ENTRY_POINT_GROUP!r}); "
                             f"installed: {sorted(available) or 'none'}")
        try:
            factory = ep.load()
            resolver = factory(PluginContext(name=name, options=dict(options.get(name, {}))))
        except Exception as e:
            raise ValueError(f"resolver plugin {name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}") from e
        if not isinstance(resolver, Resolver):
            raise ValueError(f"resolver plugin {name!r} ({ep.value}) returned {type(resolver).__name__}, not an "
                             "adapter_store.sources.Resolver")
        resolver.kind = name
        out[name] = resolver
        log.info("resolver plugin %s loaded from %s", name, ep.value)
    return out
