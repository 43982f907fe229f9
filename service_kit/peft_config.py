"""adapter_config.json (PEFT's LoraConfig): parsed and checked against what the engine applies, the same way
in the adapter store (before anything is cached) and in the worker (before anything is loaded). What the
engine cannot apply is refused with the reason (DoRA, modules_to_save, biases, Conv1D layout, unknown
modules), never ignored; values of the wrong type or range are refused too. Missing r / lora_alpha take
PEFT's LoraConfig defaults (8 and 8), as PEFT itself would. Each service maps PeftConfigError onto its own
error (the store: FAILED_PRECONDITION; the worker's engine: AdapterError of the same kind)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


class PeftConfigError(ValueError):
    """An adapter_config.json that cannot be served. kind: "invalid" (malformed) or "unsupported" (valid
    PEFT the engine does not apply)."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ConfigSummary:
    """What adapter_config.json declares, as validated."""

    peft_type: str
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str = ""
    # Largest rank of any module, rank_pattern and the tensors included.
    max_rank: int = 0
    # target_modules was one string: a regex over module paths (or "all-linear"), not a list of names.
    targets_are_regex: bool = False


# The projections the engine serves (gpu_worker/engine/lora/layout.py MODULE_GROUP) and where they live.
MODULE_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8
MAX_PATTERN_KEY = 256


def parse_peft_config(raw: bytes, what: str) -> ConfigSummary:
    """The validated summary of adapter_config.json's bytes; PeftConfigError with the reason otherwise. `what`
    names the adapter in messages ("adapter 'x'")."""
    try:
        cfg = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftConfigError(f"{what}: adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise PeftConfigError(f"{what}: adapter_config.json must hold a JSON object")
    peft_type = str(cfg.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise PeftConfigError(f"{what} is peft_type {peft_type or 'unset'}; only LORA adapters are served",
                              "unsupported")
    refusals = [
        (cfg.get("use_dora"), "uses DoRA (use_dora=true), which the engine does not apply"),
        (cfg.get("modules_to_save"),
         f"has modules_to_save {cfg.get('modules_to_save')}: fully trained modules are not applied"),
        (cfg.get("bias", "none") not in ("none", None), f"trains biases (bias={cfg.get('bias')!r}); only 'none'"),
        (cfg.get("lora_bias"), "has a bias on lora_B (lora_bias=true), which the engine does not apply"),
        (cfg.get("fan_in_fan_out"), "uses fan_in_fan_out (Conv1D layout), which Llama-family models do not have"),
    ]
    for bad, why in refusals:
        if bad:
            raise PeftConfigError(f"{what} {why}", "unsupported")

    r = _positive(cfg.get("r", PEFT_DEFAULT_R), "r", what, integer=True)
    alpha = _positive(cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA), "lora_alpha", what, integer=False)
    rank_pattern = _pattern(cfg.get("rank_pattern"), "rank_pattern", what, integer=True)
    alpha_pattern = _pattern(cfg.get("alpha_pattern"), "alpha_pattern", what, integer=False)
    use_rslora = cfg.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise PeftConfigError(f"{what}: use_rslora must be true or false, not {use_rslora!r}")
    base = cfg.get("base_model_name_or_path") or ""
    if not isinstance(base, str):
        raise PeftConfigError(f"{what}: base_model_name_or_path must be a string, not {base!r}")
    targets = _targets(cfg, what)
    return ConfigSummary(peft_type="LORA", rank=r, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                         rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, base_model_name_or_path=base,
                         max_rank=max([r, *rank_pattern.values()]),
                         targets_are_regex=isinstance(cfg.get("target_modules"), str))


def pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module's path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module_path):
            return value
    return default


def targets_module(summary: ConfigSummary, module_path: str) -> bool:
    """Whether target_modules selects a module path: a list by suffix, a string as a full regex (PEFT's rules)."""
    if summary.targets_are_regex:
        key = summary.target_modules[0]
        return key == "all-linear" or re.fullmatch(key, module_path) is not None
    return any(module_path == t or module_path.endswith("." + t) for t in summary.target_modules)


def _targets(cfg: dict, what: str) -> tuple[str, ...]:
    targets = cfg.get("target_modules")
    if isinstance(targets, str):  # a regex over module paths, or "all-linear": the tensors decide
        try:
            re.compile(targets)
        except re.error as e:
            raise PeftConfigError(f"{what}: target_modules {targets!r} is not a valid pattern ({e})") from None
        return (targets,)
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise PeftConfigError(f"{what}: target_modules must be a non-empty list of module names")
    unknown = sorted({t for t in targets if t.rsplit(".", 1)[-1] not in MODULE_BLOCK})
    if unknown:
        raise PeftConfigError(f"{what} targets {unknown}, which the engine does not serve; supported: "
                              f"{', '.join(MODULE_BLOCK)}", "unsupported")
    return tuple(targets)


def _positive(value, field: str, what: str, integer: bool):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise PeftConfigError(f"{what}: {field} must be {kind}, not {value!r}")
    return value if integer else float(value)


def _pattern(value, field: str, what: str, integer: bool) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PeftConfigError(f"{what}: {field} must be a JSON object of module -> value")
    out = {}
    for key, v in value.items():
        if len(key) > MAX_PATTERN_KEY:
            raise PeftConfigError(f"{what}: {field} key {key[:40]!r}... is longer than {MAX_PATTERN_KEY}")
        try:
            re.compile(key)
        except re.error as e:
            raise PeftConfigError(f"{what}: {field} key {key!r} is not a valid pattern ({e})") from None
        out[key] = _positive(v, f"{field}[{key!r}]", what, integer)
    return out
