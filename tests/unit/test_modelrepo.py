"""The encoder model repository: ONNX export, config rendering, version layout, the python-backend
adapter (run against a stand-in for Triton's pb_utils) and the client's input checks."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
ort = pytest.importorskip("onnxruntime")
text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

from services.common import modelrepo as mr  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = 32


def _reference_embeddings(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """What the graph must compute, written the plain way (no folded scale/shift)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        features = model.eval()(x)
    return torch.nn.functional.normalize(features, dim=1).numpy()


def _images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=0).eval()


@pytest.fixture(scope="module")
def exported(tiny_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "encoder.onnx"
    mr.export_encoder_onnx(tiny_model, SIZE, path, MEAN, STD)
    return path


# -- export ---------------------------------------------------------------------------------------


def test_export_matches_torch_with_dynamic_batch(tiny_model: torch.nn.Module, exported: Path) -> None:
    session = _session(exported)
    for batch in (1, 5):
        images = _images(batch, seed=batch)
        got = session.run([mr.OUTPUT_NAME], {mr.INPUT_NAME: images})[0]
        want = _reference_embeddings(tiny_model, images)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_export_declares_the_tensor_contract(exported: Path) -> None:
    inputs = _session(exported).get_inputs()
    assert [i.name for i in inputs] == [mr.INPUT_NAME]
    assert inputs[0].type == "tensor(uint8)"
    assert inputs[0].shape[1:] == [SIZE, SIZE, 3] and not isinstance(inputs[0].shape[0], int)
    assert mr.read_onnx_signature(exported) == mr.OnnxSignature(image_size=SIZE, embedding_dim=96)
    assert mr.read_onnx_signature(exported.read_bytes()).embedding_dim == 96


def test_export_of_a_classifier_embeds_pre_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = timm.create_model("test_resnet", num_classes=7)
    classifier.train()  # the export must not depend on (or change) the live model's mode
    path = tmp_path / "clf.onnx"
    mr.export_encoder_onnx(classifier, SIZE, path, MEAN, STD)
    assert classifier.training
    assert mr.read_onnx_signature(path).embedding_dim == classifier.num_features
    images = _images(3)
    features = classifier.eval().forward_head(
        classifier.forward_features(
            (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - torch.tensor(MEAN).view(1, 3, 1, 1))
            / torch.tensor(STD).view(1, 3, 1, 1)
        ),
        pre_logits=True,
    )
    want = torch.nn.functional.normalize(features, dim=1).detach().numpy()
    np.testing.assert_allclose(_session(path).run(None, {mr.INPUT_NAME: images})[0], want, atol=1e-5)


def test_export_rejects_bad_arguments_and_leaves_no_file(tiny_model: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        mr.export_encoder_onnx(tiny_model, SIZE, tmp_path / "a.onnx", MEAN[:2], STD)
    with pytest.raises(ValueError):
        mr.export_encoder_onnx(tiny_model, SIZE, tmp_path / "a.onnx", MEAN, (1.0, 0.0, 1.0))

    class NotPooled(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :, 0, :]  # [batch, C, W]: neither pooled nor a feature map

    with pytest.raises(mr.ExportError):
        mr.export_encoder_onnx(NotPooled(), SIZE, tmp_path / "b.onnx", MEAN, STD)
    assert list(tmp_path.iterdir()) == []


def test_read_onnx_signature_rejects_other_graphs(tmp_path: Path) -> None:
    class Plain(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    path = tmp_path / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Plain(), (torch.zeros(2, 3, 8, 8),), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    with pytest.raises(mr.ModelRepoError):
        mr.read_onnx_signature(path)


# -- configs --------------------------------------------------------------------------------------


def _parse(text: str) -> model_config_pb2.ModelConfig:
    # Strict: an unknown field or a malformed value fails, as it would in tritonserver.
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_both_configs_parse_and_share_the_tensor_contract() -> None:
    spec = mr.EncoderModelSpec("encoder", image_size=64, embedding_dim=512, max_batch_size=64, cpu_threads=2)
    local = _parse(mr.render_config("local", spec))
    production = _parse(mr.render_config("production", spec))
    types_ = model_config_pb2.DataType
    for config in (local, production):
        assert config.name == "encoder"
        assert config.max_batch_size == 64
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("images", types_.TYPE_UINT8, [64, 64, 3])]
        assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("embeddings", types_.TYPE_FP32, [512])]
        assert config.version_policy.WhichOneof("policy_choice") == "latest"
        assert config.version_policy.latest.num_versions == 2
        assert config.HasField("dynamic_batching")
        assert len(config.model_warmup) == 1 and config.model_warmup[0].inputs["images"].zero_data
    kinds = model_config_pb2.ModelInstanceGroup.Kind
    assert local.backend == "python" and not local.platform
    assert [(g.count, g.kind) for g in local.instance_group] == [(1, kinds.KIND_CPU)]
    assert local.parameters["intra_op_threads"].string_value == "2"
    assert production.platform == "onnxruntime_onnx" and not production.backend
    assert production.default_model_filename == "model.onnx"
    assert [g.kind for g in production.instance_group] == [kinds.KIND_GPU]
    assert list(production.dynamic_batching.preferred_batch_size) == [16, 32, 64]
    assert not production.optimization.HasField("execution_accelerators")


def test_production_tensorrt_option_parses() -> None:
    config = _parse(mr.render_config("production", name="enc", image_size=224, embedding_dim=2048, tensorrt_fp16=True))
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"


def test_render_config_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        mr.render_config("staging", name="enc", image_size=64, embedding_dim=8)
    with pytest.raises(ValueError):
        mr.EncoderModelSpec("bad/name", 64, 8)
    with pytest.raises(ValueError):
        mr.EncoderModelSpec("enc", 0, 8)
    assert mr.EncoderModelSpec("enc", 8, 8, max_batch_size=24).preferred_batch_sizes() == [8, 16, 24]


# -- repository layout ----------------------------------------------------------------------------


def test_version_layout_pruning_and_rollback_files(exported: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for version in range(1, 6):
        source = exported if version % 2 else exported.read_bytes()  # both a path and bytes work
        path = mr.write_model_version(repo, "encoder", version, source, SIZE, 96, keep_versions=3)
        assert path == repo / "encoder" / str(version)
    model_dir = repo / "encoder"
    # config.pbtxt is per model: writing version 5 left 3 and 4 in place for rollback.
    assert mr.list_versions(repo, "encoder") == [3, 4, 5]
    assert sorted(p.name for p in model_dir.iterdir()) == ["3", "4", "5", "config.pbtxt", "config.production.pbtxt", "configs"]
    for version in (3, 4, 5):
        files = sorted(p.name for p in (model_dir / str(version)).iterdir())
        assert files == ["model.onnx", "model.py"]
        assert (model_dir / str(version) / "model.onnx").read_bytes() == exported.read_bytes()
    compile((model_dir / "5" / "model.py").read_text(), "model.py", "exec")
    assert _parse((model_dir / "config.pbtxt").read_text()).backend == "python"
    assert _parse((model_dir / "config.production.pbtxt").read_text()).platform == "onnxruntime_onnx"
    gpu, cpu = (_parse((model_dir / "configs" / f"{k}.pbtxt").read_text()) for k in ("production", "production-cpu"))
    assert gpu.platform == cpu.platform == "onnxruntime_onnx"
    assert gpu.instance_group[0].kind == gpu.instance_group[0].KIND_GPU
    assert cpu.instance_group[0].kind == cpu.instance_group[0].KIND_CPU

    assert mr.prune_versions(repo, "encoder", keep=1) == [3, 4]
    assert mr.discard_version(repo, "encoder", 5) and not mr.discard_version(repo, "encoder", 5)
    assert mr.list_versions(repo, "encoder") == []


def test_versions_are_immutable_unless_overwritten(exported: Path, tmp_path: Path) -> None:
    mr.write_model_version(tmp_path, "encoder", 1, exported, SIZE, 96)
    with pytest.raises(FileExistsError):
        mr.write_model_version(tmp_path, "encoder", 1, exported, SIZE, 96)
    mr.write_model_version(tmp_path, "encoder", 1, exported, SIZE, 96, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "encoder").iterdir()) == ["1", "config.pbtxt", "config.production.pbtxt", "configs"]


def test_write_rejects_inconsistent_shapes(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ONNX graph"):
        mr.write_model_version(tmp_path, "encoder", 1, exported, SIZE, 128)
    with pytest.raises(ValueError):
        mr.write_model_version(tmp_path, "encoder", 0, exported, SIZE, 96)
    mr.write_model_version(tmp_path, "encoder", 1, exported, SIZE, 96)
    # Another model's shape under the same name would break the versions still served.
    config = tmp_path / "encoder" / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 96 ]", "dims: [ 128 ]"))
    with pytest.raises(ValueError, match="new model name"):
        mr.write_model_version(tmp_path, "encoder", 2, exported, SIZE, 96)
    with pytest.raises(mr.ModelRepoError):
        mr.write_model_version(tmp_path, "encoder", 3, b"not an onnx graph", SIZE, 96)


def test_failed_write_leaves_no_partial_version(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mr.write_model_version(tmp_path, "encoder", 1, exported, SIZE, 96)

    def broken_copy(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(mr.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        mr.write_model_version(tmp_path, "encoder", 2, exported, SIZE, 96)
    assert sorted(p.name for p in (tmp_path / "encoder").iterdir()) == ["1", "config.pbtxt", "config.production.pbtxt", "configs"]


# -- python-backend adapter -----------------------------------------------------------------------


class _FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _FakeResponse:
    def __init__(self, output_tensors: list[_FakeTensor], error: object = None) -> None:
        self.output_tensors, self.error = output_tensors, error


class _FakeTritonError(Exception):
    INVALID_ARG = 3

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def _fake_pb_utils() -> types.ModuleType:
    """The few pb_utils names model.py uses, with the same call shapes as Triton's python stub."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _FakeTensor
    module.InferenceResponse = _FakeResponse
    module.TritonError = _FakeTritonError
    module.TritonModelException = RuntimeError
    module.get_input_tensor_by_name = lambda request, name: _FakeTensor(name, request[name]) if name in request else None
    return module


@pytest.fixture
def adapter(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    version_dir = mr.write_model_version(tmp_path, "encoder", 1, exported, SIZE, 96)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    monkeypatch.setenv(mr.THREADS_ENV, "1")
    spec = importlib.util.spec_from_file_location("iex_encoder_model_py", version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = _parse((tmp_path / "encoder" / "config.pbtxt").read_text())
    from google.protobuf import json_format

    instance = module.TritonPythonModel()
    # The stub hands the config over as JSON with proto field names, as here.
    model_config = json_format.MessageToJson(config, preserving_proto_field_name=True)
    instance.initialize({"model_config": model_config, "model_repository": str(tmp_path / "encoder"), "model_version": "1"})
    yield instance
    instance.finalize()


def test_adapter_batches_requests_and_fails_bad_ones_alone(adapter, exported: Path) -> None:
    good_a, good_b = _images(3, seed=1), _images(2, seed=2)
    requests = [
        {"images": good_a},
        {"images": good_a.astype(np.float32)},  # wrong dtype
        {},  # missing input
        {"images": good_b},
        {"images": _images(1, size=SIZE + 1)},  # wrong size
    ]
    responses = adapter.execute(requests)
    assert len(responses) == len(requests)
    for index in (1, 2, 4):
        assert responses[index].error is not None and responses[index].output_tensors == []
        assert responses[index].error.code == _FakeTritonError.INVALID_ARG
    session = _session(exported)
    for index, images in ((0, good_a), (3, good_b)):
        assert responses[index].error is None
        (tensor,) = responses[index].output_tensors
        assert tensor.name() == "embeddings"
        np.testing.assert_allclose(tensor.as_numpy(), session.run(None, {"images": images})[0], atol=1e-6)


def test_adapter_turns_runtime_failures_into_request_errors(adapter) -> None:
    class Exploding:
        def run(self, *args: object) -> None:
            raise RuntimeError("out of memory")

    adapter.session = Exploding()
    responses = adapter.execute([{"images": _images(2)}, {"images": _images(1)}])
    assert all("out of memory" in r.error.message for r in responses)


def test_adapter_refuses_a_graph_that_does_not_match_the_config(exported: Path, tmp_path: Path, monkeypatch) -> None:
    version_dir = mr.write_model_version(tmp_path, "encoder", 1, exported, SIZE, 96)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("iex_encoder_model_py_bad", version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from google.protobuf import json_format

    config = _parse(mr.render_config("local", name="encoder", image_size=SIZE, embedding_dim=128))
    with pytest.raises(RuntimeError, match="output"):
        module.TritonPythonModel().initialize(
            {"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True)}
        )


# -- client ---------------------------------------------------------------------------------------


def test_client_checks_input_and_reports_a_missing_server() -> None:
    pytest.importorskip("tritonclient.grpc")
    # Port 9 (discard) on loopback: nothing listens, so every call fails fast.
    with mr.TritonEncoder("127.0.0.1:9", timeout_s=2.0) as client:
        assert client.server_ready() is False
        assert client.is_ready("encoder", 1) is False
        with pytest.raises(mr.InferenceError, match="uint8"):
            client.embed("encoder", 1, _images(2).astype(np.float32))
        with pytest.raises(mr.InferenceError, match="shape"):
            client.embed("encoder", 1, _images(2)[..., :2])
        with pytest.raises(mr.ServerUnavailableError):
            client.embed("encoder", 1, _images(2))
        with pytest.raises(mr.ServerUnavailableError):
            client.load("encoder")  # unreachable is retryable, unlike a refused load


def test_unavailability_is_a_retryable_dependency_error() -> None:
    from services.common.errors import DependencyUnavailable

    assert issubclass(mr.ServerUnavailableError, DependencyUnavailable)
    assert issubclass(mr.ModelNotReadyError, DependencyUnavailable)
    assert not issubclass(mr.InferenceError, DependencyUnavailable)
