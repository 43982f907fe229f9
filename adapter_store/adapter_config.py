"""adapter_config.json in the store: service_kit/peft_config.py's parser, its refusals as AdapterRejectedError
(FAILED_PRECONDITION), so nothing that fails it is ever cached."""

from __future__ import annotations

from adapter_store.errors import AdapterRejectedError
from adapter_store.manifest import ConfigSummary
from service_kit.peft_config import MODULE_BLOCK, PeftConfigError, parse_peft_config, pattern_value, targets_module

__all__ = ["MODULE_BLOCK", "parse_adapter_config", "pattern_value", "targets_module"]


def parse_adapter_config(raw: bytes, what: str) -> ConfigSummary:
    """The validated summary of adapter_config.json's bytes; AdapterRejectedError with the reason otherwise."""
    try:
        return parse_peft_config(raw, what)
    except PeftConfigError as e:
        raise AdapterRejectedError(str(e)) from None
