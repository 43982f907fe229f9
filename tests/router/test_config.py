"""RouterConfig: flags, LORASERVE_ROUTER_* variables (the names docker-compose.yml uses), checks."""

from __future__ import annotations

import pytest
import yaml

from router.config import RouterConfig
from tests.test_compose import COMPOSE_FILE, with_defaults


def test_defaults_and_flags():
    cfg = RouterConfig.from_args(["--workers", "a:1, b:2", "--port", "0"], environ={})
    assert cfg.workers == ("a:1", "b:2") and cfg.port == 0 and cfg.metrics_port == 9091
    assert not cfg.enable_runtime_lora_updating and cfg.policy().spill_load == 32 and cfg.routing == "affinity"
    assert RouterConfig.from_args(["--workers", "a:1", "--routing", "round-robin"], environ={}).routing == "round-robin"


def test_environment_fallbacks_and_flags_win():
    env = {"LORASERVE_ROUTER_PORT": "6000", "LORASERVE_ROUTER_WORKERS": "w1:50053,w2:50053",
           "LORASERVE_ROUTER_REDIS_URL": "redis://r:6379/0", "LORASERVE_ROUTER_STORE_ADDRESS": "store:50052",
           "LORASERVE_ROUTER_ENABLE_RUNTIME_LORA_UPDATING": "true", "LORASERVE_ADMIN_TOKEN": "tok-123",
           "LORASERVE_ROUTER_METRICS_PORT": "0", "LORASERVE_ROUTER_SPILL_LOAD": "4"}
    cfg = RouterConfig.from_args([], environ=env)
    assert (cfg.port, cfg.workers, cfg.redis_url, cfg.store_address) == (
        6000, ("w1:50053", "w2:50053"), "redis://r:6379/0", "store:50052")
    assert cfg.enable_runtime_lora_updating and cfg.admin_token == "tok-123" and cfg.metrics_port == 0
    assert cfg.spill_load == 4
    assert RouterConfig.from_args(["--port", "7000", "--no-enable-runtime-lora-updating"], environ=env).port == 7000
    assert "tok-123" not in repr(cfg)  # the token never shows in logs


def test_the_stack_wide_admin_switch():
    cfg = RouterConfig.from_args(["--workers", "a:1"], environ={"LORASERVE_ENABLE_RUNTIME_LORA_UPDATING": "1",
                                                                "LORASERVE_ADMIN_TOKEN": "t"})
    assert cfg.enable_runtime_lora_updating


@pytest.mark.parametrize("argv, env, words", [
    ([], {}, "no workers"),
    (["--workers", "a:1", "--enable-runtime-lora-updating"], {}, "LORASERVE_ADMIN_TOKEN is empty"),
    (["--workers", "nohostport"], {}, "not host:port"),
    (["--workers", "a:1,a:1"], {}, "duplicates"),
    (["--redis-url", "http://x"], {}, "redis_url must start with"),
    (["--workers", "a:1", "--load-factor", "0.5"], {}, "load_factor"),
    (["--workers", "a:1", "--routing", "random"], {}, "routing must be one of affinity, round-robin"),
    (["--workers", "a:1"], {"LORASERVE_ROUTER_PORT": "x"}, "LORASERVE_ROUTER_PORT='x': not an integer"),
])
def test_bad_configs_exit_with_a_message(argv, env, words, capsys):
    with pytest.raises(SystemExit) as info:
        RouterConfig.from_args(argv, environ=env)
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_the_compose_service_builds_a_config():
    service = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["router"]
    env = {k: with_defaults(v) for k, v in service["environment"].items()}
    cfg = RouterConfig.from_args([], environ=env)
    assert cfg.port == 50051 and cfg.redis_url and cfg.store_address == "adapter-store:50052"
    assert service["command"] == ["python", "-m", "router"]
