"""The contracts in protos/: they compile, the generated code is fresh, and they follow buf's STANDARD rules."""

from __future__ import annotations

import filecmp
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"
PROTO_FILES = sorted((PROTO_DIR / "loraserve" / "v1").glob("*.proto"))
MODULES = [p.stem for p in PROTO_FILES]
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def _protoc(*args: str) -> None:
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", *args, *map(str, PROTO_FILES)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"


@pytest.fixture(scope="module")
def descriptors(tmp_path_factory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("descriptors") / "set.pb"
    _protoc(f"--descriptor_set_out={out}", "--include_source_info")
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds


def test_expected_files_exist():
    assert MODULES == ["adapter_store", "common", "inference", "worker"]


def test_generated_code_matches_sources(tmp_path):
    """`make protos` output in ./loraserve/v1 is what protoc makes from protos/ now (never stale, never hand-edited)."""
    _protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    fresh = tmp_path / "loraserve" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert len(names) == 3 * len(PROTO_FILES)
    _, mismatch, errors = filecmp.cmpfiles(fresh, ROOT / "loraserve" / "v1", names, shallow=False)
    assert not mismatch and not errors, f"stale generated code {mismatch + errors}: run `make protos`"


@pytest.mark.parametrize("module", MODULES)
def test_generated_modules_import(module):
    pb2 = importlib.import_module(f"loraserve.v1.{module}_pb2")
    importlib.import_module(f"loraserve.v1.{module}_pb2_grpc")
    assert pb2.DESCRIPTOR.package == "loraserve.v1"


def test_services_and_streaming_shape():
    from loraserve.v1 import adapter_store_pb2, inference_pb2, worker_pb2

    def methods(module, service):
        svc = module.DESCRIPTOR.services_by_name[service]
        return {m.name: m.server_streaming for m in svc.methods}

    assert methods(inference_pb2, "InferenceService") == {
        "Generate": False,
        "GenerateStream": True,
        "ListModels": False,
        "LoadAdapter": False,
        "UnloadAdapter": False,
        "GetClusterStatus": False,
    }
    assert methods(worker_pb2, "WorkerService") == {
        "StreamGenerate": True,
        "PrefetchAdapter": False,
        "EvictAdapter": False,
        "GetStatus": False,
        "WatchStatus": True,
    }
    assert methods(adapter_store_pb2, "AdapterStoreService") == {
        "ResolveAdapter": False,
        "FetchAdapter": True,
        "ListAdapters": False,
        "RegisterAdapter": False,
        "DeleteAdapter": False,
    }


def test_buf_standard_naming(descriptors):
    """buf STANDARD: <Rpc>Request/<Rpc>Response per RPC, *Service names, snake fields, prefixed enums."""
    problems = []

    def check_message(msg: descriptor_pb2.DescriptorProto, where: str):
        if not PASCAL.match(msg.name):
            problems.append(f"{where}{msg.name}: message names are PascalCase")
        for field in msg.field:
            if not SNAKE.match(field.name):
                problems.append(f"{where}{msg.name}.{field.name}: fields are lower_snake_case")
        for nested in msg.nested_type:
            if not nested.options.map_entry:
                check_message(nested, f"{where}{msg.name}.")
        for enum in msg.enum_type:
            check_enum(enum)

    def check_enum(enum: descriptor_pb2.EnumDescriptorProto):
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
        if enum.value[0].number != 0 or enum.value[0].name != prefix + "UNSPECIFIED":
            problems.append(f"{enum.name}: the zero value must be {prefix}UNSPECIFIED")
        for value in enum.value:
            if not value.name.startswith(prefix) or not UPPER_SNAKE.match(value.name):
                problems.append(f"{enum.name}.{value.name}: values are UPPER_SNAKE and prefixed {prefix}")

    for f in descriptors.file:
        assert f.package == "loraserve.v1"
        assert f.name.startswith("loraserve/v1/"), "the folder matches the package"
        for msg in f.message_type:
            check_message(msg, "")
        for enum in f.enum_type:
            check_enum(enum)
        for svc in f.service:
            if not svc.name.endswith("Service"):
                problems.append(f"{svc.name}: service names end in Service")
            for m in svc.method:
                if m.input_type != f".loraserve.v1.{m.name}Request":
                    problems.append(f"{svc.name}.{m.name}: takes {m.input_type}, want {m.name}Request")
                if m.output_type != f".loraserve.v1.{m.name}Response":
                    problems.append(f"{svc.name}.{m.name}: returns {m.output_type}, want {m.name}Response")
    assert not problems, "\n".join(problems)


def test_every_rpc_and_service_is_documented(descriptors):
    """Each service and RPC carries a leading comment (the RPC's comment names its error codes)."""
    missing = []
    for f in descriptors.file:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}
        for si, svc in enumerate(f.service):
            if not comments.get((6, si)):
                missing.append(svc.name)
            for mi, m in enumerate(svc.method):
                if not comments.get((6, si, 2, mi)):
                    missing.append(f"{svc.name}.{m.name}")
    assert not missing, f"undocumented: {missing}"


def test_optional_fields_distinguish_unset_from_zero():
    """Unset temperature means the default (1.0); temperature 0 means greedy. The wire keeps them apart."""
    from loraserve.v1 import common_pb2, inference_pb2

    greedy = inference_pb2.GenerateRequest(model="sql-lora", sampling=common_pb2.SamplingParams(temperature=0.0))
    default = inference_pb2.GenerateRequest(model="sql-lora", sampling=common_pb2.SamplingParams())
    greedy2 = inference_pb2.GenerateRequest.FromString(greedy.SerializeToString())
    default2 = inference_pb2.GenerateRequest.FromString(default.SerializeToString())
    assert greedy2.sampling.HasField("temperature") and greedy2.sampling.temperature == 0.0
    assert not default2.sampling.HasField("temperature")
    assert not default2.sampling.HasField("max_tokens") and not default2.sampling.HasField("logprobs")

    prompt = common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[1, 2, 3]))
    assert prompt.WhichOneof("kind") == "token_ids"
    assert common_pb2.Prompt(text="hi").WhichOneof("kind") == "text"
    assert common_pb2.FinishReason.Value("FINISH_REASON_UNSPECIFIED") == 0
