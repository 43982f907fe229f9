"""WorkerConfig from flags and LORASERVE_WORKER_* variables; names and --lora-modules; proto -> SamplingParams."""

from __future__ import annotations

import json

import pytest

from gpu_worker import convert
from gpu_worker.adapters import LocalAdapterSource, LoRAModule, check_adapter_name
from gpu_worker.config import WorkerConfig
from gpu_worker.engine.errors import AdapterError, InvalidRequestError
from gpu_worker.engine.sampling_params import SamplingParams
from loraserve.v1 import common_pb2


def test_flags_beat_environment_which_beats_defaults(tiny_model_dir):
    env = {"LORASERVE_WORKER_MODEL_DIR": str(tiny_model_dir), "LORASERVE_WORKER_PORT": "6000",
           "LORASERVE_WORKER_MAX_LORAS": "8", "LORASERVE_WORKER_MAX_CPU_LORAS": "32",
           "LORASERVE_WORKER_MAX_LORA_RANK": "64", "LORASERVE_WORKER_STORE_ADDRESS": "adapter-store:50052",
           "LORASERVE_WORKER_ADVERTISE_ADDRESS": "gpu-worker:50053", "LORASERVE_WORKER_REDIS_URL": "redis://r:6379/0",
           "LORASERVE_WORKER_ENABLE_LORA": "true"}
    cfg = WorkerConfig.from_args(["--port", "0", "--max-lora-rank", "32"], env)
    assert (cfg.port, cfg.max_loras, cfg.max_cpu_loras, cfg.max_lora_rank) == (0, 8, 32, 32)
    assert (cfg.adapter_store, cfg.advertise_address, cfg.redis_url) == (
        "adapter-store:50052", "gpu-worker:50053", "redis://r:6379/0")
    assert cfg.model_dir == str(tiny_model_dir) and cfg.enable_lora
    args = cfg.engine_args()
    assert (args.max_loras, args.max_cpu_loras, args.max_lora_rank, args.max_waiting_requests) == (8, 32, 32, 1024)
    assert WorkerConfig.from_args(["--model-dir", str(tiny_model_dir)], {}).port == 50053
    assert args.fused_elementwise is None and args.async_scheduling is None  # the engine's: on with CUDA
    assert WorkerConfig.from_args(["--no-async-scheduling"], env).engine_args().async_scheduling is False
    assert args.overlap_lora is True
    assert WorkerConfig.from_args(["--no-overlap-lora"], env).engine_args().overlap_lora is False
    assert args.piecewise_graphs is True
    assert WorkerConfig.from_args([], {**env, "LORASERVE_WORKER_PIECEWISE_GRAPHS": "off"}
                                  ).engine_args().piecewise_graphs is False
    fused = WorkerConfig.from_args(["--enable-prefix-caching"], {**env, "LORASERVE_WORKER_FUSED_ELEMENTWISE": "on"})
    assert fused.engine_args().fused_elementwise and fused.engine_args().enable_prefix_caching
    assert not args.enable_prefix_caching
    assert not WorkerConfig.from_args(["--no-fused-elementwise"], {**env, "LORASERVE_WORKER_FUSED_ELEMENTWISE": "1"}
                                      ).fused_elementwise
    assert cfg.gil_switch_interval_ms == 0.5
    slower = WorkerConfig.from_args([], {**env, "LORASERVE_WORKER_GIL_SWITCH_INTERVAL_MS": "2"})
    assert slower.gil_switch_interval_ms == 2
    assert WorkerConfig.from_args(["--gil-switch-interval-ms", "0.25"], env).gil_switch_interval_ms == 0.25
    assert cfg.stream_interval == 1
    assert WorkerConfig.from_args([], {**env, "LORASERVE_WORKER_STREAM_INTERVAL": "8"}).stream_interval == 8


def test_lora_modules_both_forms_from_flags_and_env(tiny_model_dir, tiny_adapters):
    sql, chat = tiny_adapters["sql-lora"], tiny_adapters["chat-lora"]
    spec = json.dumps({"name": "chat", "path": str(chat), "base_model_name": "tiny"})
    cfg = WorkerConfig.from_args(["--model-dir", str(tiny_model_dir), "--lora-modules", f"sql={sql}", spec], {})
    assert cfg.lora_modules == (LoRAModule("sql", str(sql)), LoRAModule("chat", str(chat), "tiny"))
    env = {"LORASERVE_WORKER_LORA_MODULES": f"sql={sql} org/chat={chat}"}
    cfg = WorkerConfig.from_args(["--model-dir", str(tiny_model_dir)], env)
    assert [m.name for m in cfg.lora_modules] == ["sql", "org/chat"]
    env = {"LORASERVE_WORKER_LORA_MODULES": json.dumps([f"sql={sql}", json.loads(spec)])}
    assert len(WorkerConfig.from_args(["--model-dir", str(tiny_model_dir)], env).lora_modules) == 2


@pytest.mark.parametrize(
    "argv, env, words",
    [
        (["--port", "x"], {}, "invalid int"),
        ([], {"LORASERVE_WORKER_PORT": "abc"}, "LORASERVE_WORKER_PORT='abc': not an integer"),
        (["--port", "70000"], {}, "port must be in"),
        (["--lora-modules", "../x=/tmp"], {}, "not a valid adapter name"),
        (["--lora-modules", "nopath"], {}, "expected name=path"),
        (["--lora-modules", "a=/does/not/exist"], {}, "is not a directory"),
        (["--max-loras", "0"], {}, "max_loras must be >= 1"),
        (["--no-enable-lora", "--lora-modules", "a=/tmp"], {}, "enable_lora is off"),
        (["--gil-switch-interval-ms", "0"], {}, "gil_switch_interval_ms must be in (0, 1000]"),
        (["--stream-interval", "0"], {}, "stream_interval must be in [1, 1024]"),
        ([], {"LORASERVE_WORKER_ENGINE_PROCESS": "yes"}, "engine_process must be auto, on or off, not 'yes'"),
    ],
)
def test_bad_configuration_exits_with_a_message(tiny_model_dir, capsys, argv, env, words):
    with pytest.raises(SystemExit) as info:
        WorkerConfig.from_args(["--model-dir", str(tiny_model_dir), *argv], env)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_the_engine_process_is_on_with_cuda_unless_set(tiny_model_dir, monkeypatch):
    def config(*argv, env=None):
        return WorkerConfig.from_args(["--model-dir", str(tiny_model_dir), *argv], env or {})

    assert not config().use_engine_process()  # auto, on the CPU: a thread of the server's process
    assert config("--engine-process", "on").use_engine_process()
    assert not config(env={"LORASERVE_WORKER_ENGINE_PROCESS": "off"}).use_engine_process()
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert config().use_engine_process()  # auto, with CUDA: a process of its own
    assert not config("--device", "cpu").use_engine_process()


def test_model_dir_is_required(capsys):
    with pytest.raises(SystemExit):
        WorkerConfig.from_args([], {})
    assert "--model-dir (or LORASERVE_WORKER_MODEL_DIR) is required" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sql-lora", "org/sql_lora.v2", "A", "a" * 128, "org/" + "b" * 128])
def test_good_adapter_names(name):
    assert check_adapter_name(name) == name


@pytest.mark.parametrize("name", ["", "..", ".hidden", "a..b", "../etc", "a/b/c", "/abs", "a/", "a b", "a" * 129,
                                  "a\\b", "a\x00"])
def test_bad_adapter_names(name):
    with pytest.raises(InvalidRequestError):
        check_adapter_name(name)


def test_lora_root_lookup(tiny_adapters):
    root = tiny_adapters["sql-lora"].parent
    source = LocalAdapterSource([LoRAModule("pinned", str(tiny_adapters["chat-lora"]))], root)
    assert source.lookup("pinned").lora_path == str(tiny_adapters["chat-lora"])
    req = source.lookup("math-lora")
    assert req.lora_path == str(root / "math-lora") and req.lora_int_id == source.lookup("math-lora").lora_int_id
    with pytest.raises(AdapterError) as info:
        source.lookup("missing")
    assert info.value.kind == "not_found"


def test_lora_root_refuses_symlinks_out_of_it(tiny_adapters, tmp_path):
    """A name under --lora-root may not serve bytes from outside it (the directory or one of its files
    linked elsewhere); a link that stays inside the root is followed."""
    import shutil

    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(tiny_adapters["sql-lora"], outside / "x")
    root.mkdir()
    (root / "dir-out").symlink_to(outside / "x", target_is_directory=True)
    shutil.copytree(tiny_adapters["sql-lora"], root / "file-out")
    (root / "file-out" / "adapter_config.json").unlink()
    (root / "file-out" / "adapter_config.json").symlink_to(outside / "x" / "adapter_config.json")
    shutil.copytree(tiny_adapters["sql-lora"], root / "fine")
    (root / "alias").symlink_to(root / "fine", target_is_directory=True)
    source = LocalAdapterSource([], root)
    for name in ("dir-out", "file-out"):
        with pytest.raises(AdapterError) as info:
            source.lookup(name)
        assert info.value.kind == "invalid" and "outside the adapters root" in str(info.value)
    assert source.lookup("alias").lora_path == str(root / "alias")


def test_sampling_params_unset_fields_take_vllm_defaults():
    # the served form: vLLM's defaults, and delta outputs (a stream sends deltas; totals once, at the end)
    assert convert.sampling_params(common_pb2.SamplingParams()) == SamplingParams(output_kind="delta")
    got = convert.sampling_params(common_pb2.SamplingParams(
        max_tokens=7, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=["\n"], stop_token_ids=[2],
        repetition_penalty=1.1, logprobs=0, min_tokens=1, ignore_eos=True))
    want = SamplingParams(max_tokens=7, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=["\n"], stop_token_ids=[2],
                          repetition_penalty=1.1, logprobs=0, min_tokens=1, ignore_eos=True, output_kind="delta")
    assert got == want  # float32 on the wire, the client's decimal here
    assert convert.sampling_params(common_pb2.SamplingParams(temperature=0.0)).is_greedy


def test_long_prompts_tokenize_as_the_engine_does(tiny_model_dir):
    from gpu_worker.async_engine import encode_releasing_gil
    from gpu_worker.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model_dir)
    for text in ["", "a", "hello world " * 500, "ünïcödé 😀 " * 300]:
        assert encode_releasing_gil(tok, text) == tok.encode(text)
