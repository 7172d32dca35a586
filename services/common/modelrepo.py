"""The encoder's Triton model repository: export, layout, configs and the client that calls it.

The trainer writes versions with `export_encoder_onnx` + `write_model_version`; the scorer calls
Triton through `TritonEncoder`. Both sides share the tensor contract below, so it is written once:

- input  ``images``:     UINT8 [batch, S, S, 3], RGB, already resized to S x S by the client
- output ``embeddings``: FP32  [batch, D], L2-normalised

Pixel scaling, mean/std normalisation and NHWC -> NCHW live inside the ONNX graph, so a client
never needs to know the training normalisation, and uint8 pixels are 4x smaller on the wire.

Repository layout (one model directory, several immutable versions)::

    <repo>/<model>/config.pbtxt              local server (pytriton's tritonserver: python backend only)
    <repo>/<model>/config.production.pbtxt   official Triton image (onnxruntime_onnx, KIND_GPU);
                                             the deployment renames it to config.pbtxt
    <repo>/<model>/<version>/model.onnx      the exported encoder (served by both configs)
    <repo>/<model>/<version>/model.py        python-backend adapter running model.onnx in onnxruntime

Heavy imports (torch, onnx, onnxruntime, tritonclient) happen inside the functions that need
them: the scorer imports this module for the client and must never pay for torch.

For a repository in object storage, build the version with `write_model_version` in a local
directory and upload it before asking Triton to load it: with explicit model control Triton
reads a version only when told to, so the upload order does not matter.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from services.common.errors import DependencyUnavailable

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
ONNX_FILENAME = "model.onnx"
PYTHON_MODEL_FILENAME = "model.py"
CONFIG_FILENAME = "config.pbtxt"
PRODUCTION_CONFIG_FILENAME = "config.production.pbtxt"
DEFAULT_OPSET = 17
# Triton serves the newest two (new + one to roll back to). The disk keeps one more: writing
# version N must not delete N-2 while Triton still serves it, before N is loaded.
SERVED_VERSIONS = 2
KEPT_VERSIONS = 3
# Environment override for the python backend's onnxruntime threads (wins over the config).
THREADS_ENV = "IEX_TRITON_ORT_THREADS"

_STAGING_PREFIX = ".staging-"
_TRASH_PREFIX = ".trash-"
_STALE_STAGING_S = 3600.0
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelRepoError(RuntimeError):
    """Base of every error raised by this module."""


class ExportError(ModelRepoError):
    """The ONNX export failed or does not reproduce the torch model."""


class ModelLoadError(ModelRepoError):
    """Triton refused to load a model (or the requested version is not ready after loading)."""


class InferenceError(ModelRepoError):
    """An inference request failed: bad input, model not ready, server error or timeout."""


class ModelNotReadyError(InferenceError, DependencyUnavailable):
    """The server answered, but the model (or that version of it) is not loaded and ready:
    retry the work later (after a load), never dead-letter it."""


class ServerUnavailableError(InferenceError, DependencyUnavailable):
    """Triton could not be reached at all: retry the work later."""


# --------------------------------------------------------------------------------------------
# Export


def _pixel_encoder(model: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    import torch
    import torch.nn.functional as F

    class PixelEncoder(torch.nn.Module):
        """uint8 NHWC pixels in, unit-norm embeddings out: the whole preprocessing in the graph."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = model
            mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, 3, 1, 1)
            std_t = torch.tensor([float(s) for s in std], dtype=torch.float32).view(1, 3, 1, 1)
            # ((x / 255) - mean) / std folded into one multiply-add.
            self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
            self.register_buffer("shift", -mean_t / std_t, persistent=False)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
            features = _pooled_features(self.backbone, x)
            return F.normalize(features, p=2.0, dim=1, eps=1e-12)

    return PixelEncoder()


def _pooled_features(backbone: Any, x: Any) -> Any:
    # A timm model built with num_classes=0 already returns pooled features from forward();
    # one with a classifier must stop before it (pre_logits), or we would embed class logits.
    if getattr(backbone, "num_classes", 0) and hasattr(backbone, "forward_head"):
        features = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
    else:
        features = backbone(x)
    if features.dim() == 4:  # an unpooled feature map: global average pool it
        features = features.mean(dim=(2, 3))
    if features.dim() != 2:
        raise ExportError(f"backbone returned features of shape {tuple(features.shape)}, expected [batch, D]")
    return features


def export_encoder_onnx(
    model: Any,
    image_size: int,
    path: str | os.PathLike[str],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    atol: float = 1e-4,
) -> None:
    """Exports `model` (a backbone returning pooled features) as the encoder ONNX graph at `path`.

    The batch axis is dynamic. With `verify`, the exported graph is run in onnxruntime on random
    pixels and compared with torch before the file appears at `path`, so a bad export never
    reaches the model repository. `model` itself is not modified (a CPU copy is exported).
    """
    import warnings

    import torch

    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need 3 values (RGB)")
    if any(float(s) == 0.0 for s in std):
        raise ValueError("std values must be non-zero")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    # Export a CPU fp32 copy: the graph then does not depend on where training ran, the live
    # model's mode and device stay untouched, and the torch reference is not computed in TF32
    # (which cuDNN uses by default on recent GPUs and which would fail a tight comparison).
    backbone = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    wrapper = _pixel_encoder(backbone, mean, std).eval()
    generator = torch.Generator().manual_seed(0)
    # Batch 2, not 1: a batch of 1 lets the tracer specialise reshapes to a constant batch.
    sample = torch.randint(0, 256, (2, image_size, image_size, 3), dtype=torch.uint8, generator=generator)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
            # onnxscript (not a dependency); the TorchScript one handles every timm CNN we use.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                wrapper,
                (sample,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
            reference = wrapper(sample).float().cpu()
            expected_dim = reference.shape[1]
            expected = reference.numpy()
        _pin_output_shape(tmp, int(expected_dim))
        if verify:
            got = _run_onnx(tmp, sample.cpu().numpy())
            if got.shape != expected.shape:
                raise ExportError(f"ONNX output shape {got.shape} != torch output shape {expected.shape}")
            err = float(np.max(np.abs(got - expected)))
            if not err <= atol:
                raise ExportError(f"ONNX output differs from torch by {err:.3g} (> {atol:g})")
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as exc:  # torch/onnx raise many types; the trainer wants one
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _pin_output_shape(path: Path, dim: int) -> None:
    """Writes [batch, D] into the graph's output type: the TorchScript exporter leaves D symbolic
    after the normalisation, and servers and `read_onnx_signature` read D from the graph."""
    import onnx

    graph_model = onnx.load(str(path))
    dims = graph_model.graph.output[0].type.tensor_type.shape.dim
    while len(dims) < 2:
        dims.add()
    del dims[2:]
    dims[0].Clear()
    dims[0].dim_param = "batch"
    dims[1].Clear()
    dims[1].dim_value = dim
    onnx.checker.check_model(graph_model, full_check=True)
    onnx.save(graph_model, str(path))


def _run_onnx(path: str | os.PathLike[str] | bytes, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a 2-image check; threads would cost more than they save
    source = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


@dataclass(frozen=True)
class OnnxSignature:
    image_size: int
    embedding_dim: int


def read_onnx_signature(onnx_path_or_bytes: str | os.PathLike[str] | bytes) -> OnnxSignature:
    """Reads image size and embedding dimension from an exported encoder, checking the contract."""
    import onnx

    try:
        if isinstance(onnx_path_or_bytes, bytes):
            graph_model = onnx.load_from_string(onnx_path_or_bytes)
        else:
            graph_model = onnx.load(str(onnx_path_or_bytes), load_external_data=False)
    except OSError:
        raise
    except Exception as exc:  # protobuf's DecodeError and friends: the bytes are not ONNX
        raise ModelRepoError(f"not a readable ONNX model: {exc}") from exc
    graph = graph_model.graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ModelRepoError(
            f"ONNX graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
            f"expected {INPUT_NAME!r} and {OUTPUT_NAME!r}"
        )
    in_type = inputs[INPUT_NAME].type.tensor_type
    out_type = outputs[OUTPUT_NAME].type.tensor_type
    if in_type.elem_type != onnx.TensorProto.UINT8 or out_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelRepoError("ONNX encoder must take uint8 images and return float32 embeddings")
    in_dims = [d.dim_value if d.HasField("dim_value") else None for d in in_type.shape.dim]
    out_dims = [d.dim_value if d.HasField("dim_value") else None for d in out_type.shape.dim]
    if len(in_dims) != 4 or in_dims[3] != 3 or in_dims[1] is None or in_dims[1] != in_dims[2]:
        raise ModelRepoError(f"ONNX input shape {in_dims} is not [batch, S, S, 3]")
    if len(out_dims) != 2 or out_dims[1] is None:
        raise ModelRepoError(f"ONNX output shape {out_dims} is not [batch, D] with a static D")
    return OnnxSignature(image_size=int(in_dims[1]), embedding_dim=int(out_dims[1]))


# --------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class EncoderModelSpec:
    """What both configs are rendered from."""

    name: str
    image_size: int
    embedding_dim: int
    max_batch_size: int = 64
    served_versions: int = SERVED_VERSIONS
    instance_count: int = 1
    # Queueing delay the dynamic batcher may add to fill a batch; 0 batches only what is waiting.
    max_queue_delay_us: int = 1000
    # onnxruntime intra-op threads in the python backend; 0 lets onnxruntime use every core.
    cpu_threads: int = 0
    # Production only: run the ONNX graph through onnxruntime's TensorRT execution provider.
    tensorrt_fp16: bool = False
    warmup: bool = True

    def __post_init__(self) -> None:
        if not _MODEL_NAME_RE.match(self.name):
            raise ValueError(f"invalid Triton model name {self.name!r}")
        for field_name in ("image_size", "embedding_dim", "max_batch_size", "served_versions", "instance_count"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"{field_name} must be >= 1, got {getattr(self, field_name)}")
        if self.max_queue_delay_us < 0 or self.cpu_threads < 0:
            raise ValueError("max_queue_delay_us and cpu_threads must be >= 0")

    def preferred_batch_sizes(self) -> list[int]:
        sizes = [s for s in (8, 16, 32, 64, 128, 256) if s <= self.max_batch_size]
        if self.max_batch_size not in sizes:
            sizes.append(self.max_batch_size)
        return sizes[-3:]


CONFIG_KINDS = ("local", "production", "production-cpu")


def render_config(kind: str = "local", spec: EncoderModelSpec | None = None, **spec_fields: Any) -> str:
    """Renders config.pbtxt text for `kind` "local" (python backend, CPU), "production"
    (onnxruntime_onnx platform, GPU) or "production-cpu" (onnxruntime_onnx on CPU nodes of the
    official image) from one spec; pass a spec or its fields as keywords."""
    if spec is None:
        spec = EncoderModelSpec(**spec_fields)
    elif spec_fields:
        raise TypeError("pass either spec or its fields, not both")
    if kind not in CONFIG_KINDS:
        raise ValueError(f"kind must be one of {', '.join(CONFIG_KINDS)}, got {kind!r}")
    s = spec.image_size
    lines = [
        f"# Generated by services.common.modelrepo (kind={kind}); do not edit, re-export instead.",
    ]
    if kind != "local":
        lines.append("# Served by the official Triton image with --model-config-name (configs/<kind>.pbtxt).")
    lines += [f'name: "{spec.name}"']
    if kind == "local":
        # pytriton's tritonserver ships only the python backend; model.py runs model.onnx.
        lines.append('backend: "python"')
    else:
        lines.append('platform: "onnxruntime_onnx"')
        lines.append(f'default_model_filename: "{ONNX_FILENAME}"')
    lines += [
        f"max_batch_size: {spec.max_batch_size}",
        "input [",
        f'  {{ name: "{INPUT_NAME}" data_type: TYPE_UINT8 dims: [ {s}, {s}, 3 ] }}',
        "]",
        "output [",
        f'  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ {spec.embedding_dim} ] }}',
        "]",
        f"version_policy: {{ latest: {{ num_versions: {spec.served_versions} }} }}",
    ]
    if kind == "local":
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {spec.max_queue_delay_us} }}")
        lines.append(f"instance_group [ {{ count: {spec.instance_count} kind: KIND_CPU }} ]")
        lines.append(f'parameters {{ key: "intra_op_threads" value: {{ string_value: "{spec.cpu_threads}" }} }}')
    else:
        preferred = ", ".join(str(b) for b in spec.preferred_batch_sizes())
        lines.append(
            f"dynamic_batching {{ preferred_batch_size: [ {preferred} ] "
            f"max_queue_delay_microseconds: {spec.max_queue_delay_us} }}"
        )
        device = "KIND_GPU" if kind == "production" else "KIND_CPU"
        lines.append(f"instance_group [ {{ count: {spec.instance_count} kind: {device} }} ]")
        if spec.tensorrt_fp16 and kind == "production":
            lines += [
                "optimization { execution_accelerators { gpu_execution_accelerator: [ {",
                '  name: "tensorrt"',
                '  parameters { key: "precision_mode" value: "FP16" }',
                '  parameters { key: "max_workspace_size_bytes" value: "1073741824" }',
                "} ] } }",
            ]
    if spec.warmup:
        # A load that cannot run one batch fails at load time, not on the scorer's first request.
        lines += [
            "model_warmup [ {",
            '  name: "zeros"',
            "  batch_size: 1",
            f'  inputs {{ key: "{INPUT_NAME}" value: {{ data_type: TYPE_UINT8 dims: [ {s}, {s}, 3 ] zero_data: true }} }}',
            "} ]",
        ]
    return "\n".join(lines) + "\n"


# The python-backend adapter written next to each model.onnx. It is self-contained (only numpy,
# onnxruntime and triton_python_backend_utils) because it runs inside Triton's python stub.
PYTHON_BACKEND_MODEL = '''\
"""Triton python-backend adapter: serves the sibling model.onnx with onnxruntime (CPU).

Generated by services.common.modelrepo; the official Triton image ignores this file and runs
model.onnx with its onnxruntime backend instead.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
THREADS_ENV = "IEX_TRITON_ORT_THREADS"


def _error(message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = os.path.dirname(os.path.abspath(__file__))
        onnx_path = os.path.join(here, "model.onnx")
        inputs = {i["name"]: i for i in config["input"]}
        outputs = {o["name"]: o for o in config["output"]}
        self.item_shape = tuple(int(d) for d in inputs[INPUT_NAME]["dims"])
        self.dim = int(outputs[OUTPUT_NAME]["dims"][0])
        self.max_batch = int(config.get("max_batch_size", 0)) or None

        params = config.get("parameters", {})
        threads = os.environ.get(THREADS_ENV) or params.get("intra_op_threads", {}).get("string_value", "0")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        # One request at a time per instance: parallelism comes from intra-op threads and
        # from instance_group count, not from onnxruntime's inter-op pool.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle intra-op threads sleep instead of spinning: between requests a spinning pool burns the
        # cores that dedup and the scorer need (bench/pipeline: Triton's CPU per image).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])

        # Fail the load, not the first request, when the graph does not match the config.
        graph_in = {i.name: i for i in self.session.get_inputs()}
        graph_out = {o.name: o for o in self.session.get_outputs()}
        if INPUT_NAME not in graph_in or OUTPUT_NAME not in graph_out:
            raise pb_utils.TritonModelException(
                f"model.onnx has inputs {sorted(graph_in)} / outputs {sorted(graph_out)}, "
                f"config expects {INPUT_NAME!r} / {OUTPUT_NAME!r}"
            )
        if graph_in[INPUT_NAME].type != "tensor(uint8)" or tuple(graph_in[INPUT_NAME].shape[1:]) != self.item_shape:
            raise pb_utils.TritonModelException(
                f"model.onnx input is {graph_in[INPUT_NAME].type} {graph_in[INPUT_NAME].shape}, "
                f"config expects uint8 [batch, {list(self.item_shape)}]"
            )
        if graph_out[OUTPUT_NAME].shape[1:] != [self.dim]:
            raise pb_utils.TritonModelException(
                f"model.onnx output is {graph_out[OUTPUT_NAME].shape}, config expects [batch, {self.dim}]"
            )

    def _check(self, array):
        if array.dtype != np.uint8:
            return f"{INPUT_NAME} must be UINT8, got {array.dtype}"
        if array.ndim != 4 or tuple(array.shape[1:]) != self.item_shape:
            return f"{INPUT_NAME} must have shape [batch, {list(self.item_shape)}], got {list(array.shape)}"
        if array.shape[0] == 0:
            return f"{INPUT_NAME} has an empty batch"
        return None

    def execute(self, requests):
        responses = [None] * len(requests)
        owners, arrays = [], []
        for index, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
            if tensor is None:
                responses[index] = _error(f"missing input {INPUT_NAME!r}")
                continue
            array = tensor.as_numpy()
            problem = self._check(array)
            if problem is not None:
                responses[index] = _error(problem)
                continue
            owners.append(index)
            arrays.append(array)
        if arrays:
            # The dynamic batcher hands over several requests at once: one onnxruntime call for
            # all of them is what makes batching pay on CPU.
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            try:
                result = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
            except Exception as exc:  # an onnxruntime failure fails these requests, not the model
                for index in owners:
                    responses[index] = _error(f"onnxruntime failed: {exc}")
            else:
                result = np.ascontiguousarray(result, dtype=np.float32)
                start = 0
                for index, array in zip(owners, arrays):
                    stop = start + array.shape[0]
                    out = pb_utils.Tensor(OUTPUT_NAME, result[start:stop])
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[out])
                    start = stop
        return responses

    def finalize(self):
        self.session = None
'''


# --------------------------------------------------------------------------------------------
# Repository layout


def list_versions(repository: str | os.PathLike[str], model_name: str) -> list[int]:
    """Complete versions on disk, oldest first (staging and trash directories are not versions)."""
    model_dir = Path(repository) / model_name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _existing_tensor_shapes(config_path: Path) -> tuple[int, int] | None:
    """(image_size, embedding_dim) declared by an existing config.pbtxt, None if there is none."""
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    image = re.search(rf'name:\s*"{INPUT_NAME}"[^}}]*?dims:\s*\[\s*(\d+)', text)
    dim = re.search(rf'name:\s*"{OUTPUT_NAME}"[^}}]*?dims:\s*\[\s*(\d+)', text)
    if not image or not dim:
        return None
    return int(image.group(1)), int(dim.group(1))


def _clean_leftovers(model_dir: Path) -> None:
    now = time.time()
    for entry in model_dir.iterdir():
        if entry.name.startswith(_TRASH_PREFIX) or (
            entry.name.startswith(_STAGING_PREFIX) and now - entry.stat().st_mtime > _STALE_STAGING_S
        ):
            shutil.rmtree(entry, ignore_errors=True)


def write_model_version(
    repository: str | os.PathLike[str],
    model_name: str,
    version: int,
    onnx_path_or_bytes: str | os.PathLike[str] | bytes,
    image_size: int,
    embedding_dim: int,
    max_batch_size: int = 64,
    *,
    keep_versions: int = KEPT_VERSIONS,
    overwrite: bool = False,
    spec: EncoderModelSpec | None = None,
) -> Path:
    """Publishes `onnx` as `<repository>/<model_name>/<version>/` and returns that directory.

    The version directory is built under a hidden staging name in the model directory (same
    file system) and renamed into place, so Triton, which ignores non-numeric directory names,
    never sees a half-written version. Both configs are (re)written atomically afterwards; then
    versions older than the newest `keep_versions` are pruned. Versions are immutable: writing
    an existing one raises FileExistsError unless `overwrite`. A change of tensor shapes within
    a model raises ValueError: served versions share one config, so a new shape needs a new
    model name.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be an integer >= 1, got {version!r}")
    if keep_versions < 1:
        raise ValueError("keep_versions must be >= 1")
    if spec is None:
        spec = EncoderModelSpec(model_name, image_size, embedding_dim, max_batch_size)
    elif (spec.name, spec.image_size, spec.embedding_dim) != (model_name, image_size, embedding_dim):
        raise ValueError("spec disagrees with model_name / image_size / embedding_dim")

    signature = read_onnx_signature(onnx_path_or_bytes)
    if (signature.image_size, signature.embedding_dim) != (image_size, embedding_dim):
        raise ValueError(
            f"ONNX graph takes {signature.image_size}px and returns {signature.embedding_dim}-d, "
            f"but image_size={image_size} embedding_dim={embedding_dim} were given"
        )

    model_dir = Path(repository) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    existing = _existing_tensor_shapes(model_dir / CONFIG_FILENAME)
    if existing is not None and existing != (image_size, embedding_dim) and list_versions(repository, model_name):
        raise ValueError(
            f"model {model_name!r} serves {existing[0]}px -> {existing[1]}-d; a {image_size}px -> "
            f"{embedding_dim}-d version needs a new model name"
        )
    _clean_leftovers(model_dir)

    final = model_dir / str(version)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; versions are immutable (pass overwrite=True to replace)")

    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{version}-", dir=model_dir))
    try:
        if isinstance(onnx_path_or_bytes, bytes):
            (staging / ONNX_FILENAME).write_bytes(onnx_path_or_bytes)
        else:
            shutil.copyfile(onnx_path_or_bytes, staging / ONNX_FILENAME)
        (staging / PYTHON_MODEL_FILENAME).write_text(PYTHON_BACKEND_MODEL, encoding="utf-8")
        for child in staging.iterdir():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; Triton may run as another user
        if final.exists():
            trash = model_dir / f"{_TRASH_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, final)
        _fsync_dir(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    _write_text_atomic(model_dir / CONFIG_FILENAME, render_config("local", spec))
    _write_text_atomic(model_dir / PRODUCTION_CONFIG_FILENAME, render_config("production", spec))
    # The chart's Triton picks one of these with --model-config-name (GPU or CPU nodes).
    (model_dir / "configs").mkdir(exist_ok=True)
    for kind in ("production", "production-cpu"):
        _write_text_atomic(model_dir / "configs" / f"{kind}.pbtxt", render_config(kind, spec))
    prune_versions(repository, model_name, keep=keep_versions)
    return final


def prune_versions(repository: str | os.PathLike[str], model_name: str, keep: int = KEPT_VERSIONS) -> list[int]:
    """Deletes all but the newest `keep` versions; returns the versions removed."""
    if keep < 1:
        raise ValueError("keep must be >= 1")
    return [old for old in list_versions(repository, model_name)[:-keep] if discard_version(repository, model_name, old)]


def discard_version(repository: str | os.PathLike[str], model_name: str, version: int) -> bool:
    """Removes one version (e.g. one Triton refused to load); True when it existed.

    Needed because the latest-N policy would otherwise retry a broken newest version on every
    later load of the model and fail each time."""
    model_dir = Path(repository) / model_name
    path = model_dir / str(int(version))
    if not path.is_dir():
        return False
    # Rename first so a concurrent Triton load never reads a half-deleted version.
    trash = model_dir / f"{_TRASH_PREFIX}{int(version)}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return True


# --------------------------------------------------------------------------------------------
# Client


# gRPC re-dials a lost server with a backoff that grows to two minutes by default: after a Triton
# restart (a crash, a node drain) the scorer would sit idle that long with Triton ready. Capped here,
# a dead Triton is re-dialled every few seconds and a restarted one is used at once.
TRITON_RECONNECT_BACKOFF_MAX_MS = 3000


def _triton_channel_args(grpcclient) -> list[tuple[str, Any]]:
    """tritonclient's own channel defaults (message sizes, keepalive) plus a bounded reconnect backoff."""
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", 2**31 - 1),
        ("grpc.max_receive_message_length", 2**31 - 1),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", TRITON_RECONNECT_BACKOFF_MAX_MS),
    ]


class TritonEncoder:
    """Calls the encoder served by Triton over gRPC.

    Loading decision: the repository config keeps a ``latest: {num_versions: 2}`` policy and
    `load` never overrides it. A load re-reads the model directory and serves its newest two
    versions; `load(name, version)` additionally checks that `version` is among the ready ones.
    Pinning versions with a config override would need the client to rebuild the whole config
    (local or production, which it cannot tell apart) and would hide what is on disk; with the
    latest policy, rolling back means asking for the older of the two served versions.
    Triton keeps serving the previously loaded versions when a load fails, so a broken new
    version costs a ModelLoadError, not an outage; the writer should then remove or replace it,
    since every later load of that model would try it again (see `discard_version`).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout_s: float = 60.0,
        load_timeout_s: float = 300.0,
        max_in_flight: int = 4,
        verbose: bool = False,
    ) -> None:
        import tritonclient.grpc as grpcclient

        if url is None:
            from services.common.endpoints import DEFAULT_TRITON_GRPC

            url = DEFAULT_TRITON_GRPC
        self.url = url
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self.max_in_flight = max(1, max_in_flight)
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(url=self.url, verbose=verbose, channel_args=_triton_channel_args(grpcclient))
        self._shapes: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        # One bound for every thread using this client (consumer and gRPC threads alike), so
        # the requests a whole replica keeps in flight never exceed max_in_flight.
        self._slots = threading.BoundedSemaphore(self.max_in_flight)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "TritonEncoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def server_ready(self) -> bool:
        """True when the server answers and is ready; never raises."""
        try:
            return bool(self._client.is_server_ready(client_timeout=min(self.timeout_s, 5.0)))
        except Exception:  # noqa: BLE001 - readiness is a yes/no question
            return False

    def is_ready(self, model_name: str, version: int | None = None) -> bool:
        try:
            return bool(
                self._client.is_model_ready(
                    model_name, _version_str(version), client_timeout=min(self.timeout_s, 5.0)
                )
            )
        except Exception:  # noqa: BLE001
            return False

    def ready_versions(self, model_name: str) -> list[int]:
        """Versions of `model_name` Triton reports READY, oldest first."""
        try:
            index = self._client.get_model_repository_index(as_json=True, client_timeout=self.timeout_s)
        except self._grpc_exception() as exc:
            raise _server_error(exc, f"reading the repository index of {self.url}") from exc
        versions = []
        for entry in index.get("models", []):
            if entry.get("name") == model_name and entry.get("state") == "READY" and entry.get("version", "").isdigit():
                versions.append(int(entry["version"]))
        return sorted(versions)

    def load(self, model_name: str, version: int | None = None) -> list[int]:
        """(Re)loads `model_name` from the repository; returns the versions ready afterwards.

        Raises ModelLoadError when Triton rejects the load (the versions loaded before keep
        serving) or when `version` is given and is not ready afterwards, and
        ServerUnavailableError when Triton cannot be reached.
        """
        try:
            self._client.load_model(model_name, client_timeout=self.load_timeout_s)
        except self._grpc_exception() as exc:
            error = _server_error(exc, f"loading {model_name!r}")
            if isinstance(error, ServerUnavailableError):
                raise error from exc
            message = exc.message() if hasattr(exc, "message") else str(exc)
            raise ModelLoadError(f"Triton failed to load {model_name!r}: {message}") from exc
        finally:
            self._shapes.pop(model_name, None)
        ready = self.ready_versions(model_name)
        if version is not None and version not in ready:
            raise ModelLoadError(f"{model_name!r} version {version} is not ready after loading (ready: {ready})")
        return ready

    def unload(self, model_name: str, *, wait_s: float = 30.0) -> None:
        """Unloads every version of `model_name` and waits until Triton stops serving it."""
        try:
            self._client.unload_model(model_name, client_timeout=self.timeout_s)
        except self._grpc_exception() as exc:
            raise ModelLoadError(f"Triton failed to unload {model_name!r}: {exc}") from exc
        self._shapes.pop(model_name, None)
        deadline = time.monotonic() + wait_s
        while self.is_ready(model_name) and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- inference -----------------------------------------------------------------------------

    def embed(
        self,
        model_name: str,
        version: int | None,
        images: np.ndarray,
        *,
        batch_size: int | None = None,
        on_response: Callable[[int, float], None] | None = None,
    ) -> np.ndarray:
        """Embeds uint8 images [N, S, S, 3] -> float32 [N, D] with `version` (None: newest ready).

        Images are sent in requests of `batch_size` (default and ceiling: the model's
        max_batch_size), concurrently, at most `max_in_flight` requests at a time for the whole
        client, so memory and server queue stay bounded. `on_response(images, seconds)` is
        called for every successful request (latency and batch-size metrics).
        """
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise InferenceError(f"images must be uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[3] != 3:
            raise InferenceError(f"images must have shape [N, S, S, 3], got {list(images.shape)}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chunk, dim = self._model_shape(model_name, version)
        if batch_size is not None:
            chunk = min(chunk, batch_size)
        if images.shape[0] == 0:
            return np.zeros((0, dim), dtype=np.float32)
        chunks = [np.ascontiguousarray(images[i : i + chunk]) for i in range(0, images.shape[0], chunk)]
        if len(chunks) == 1:
            return self._infer(model_name, version, chunks[0], on_response)
        return np.concatenate(self._infer_many(model_name, version, chunks, on_response), axis=0)

    def _inputs(self, array: np.ndarray) -> tuple[list[Any], list[Any]]:
        tensor = self._grpc.InferInput(INPUT_NAME, list(array.shape), "UINT8")
        tensor.set_data_from_numpy(array)
        return [tensor], [self._grpc.InferRequestedOutput(OUTPUT_NAME)]

    def _infer(
        self,
        model_name: str,
        version: int | None,
        array: np.ndarray,
        on_response: Callable[[int, float], None] | None = None,
    ) -> np.ndarray:
        inputs, outputs = self._inputs(array)
        with self._slots:
            started = time.perf_counter()
            try:
                result = self._client.infer(
                    model_name,
                    inputs,
                    model_version=_version_str(version),
                    outputs=outputs,
                    client_timeout=self.timeout_s,
                )
            except self._grpc_exception() as exc:
                raise _server_error(exc, f"inference on {model_name!r} version {version or 'latest'}") from exc
            elapsed = time.perf_counter() - started
        embeddings = _as_embeddings(result.as_numpy(OUTPUT_NAME), array.shape[0])
        if on_response is not None:
            on_response(array.shape[0], elapsed)
        return embeddings

    def _infer_many(
        self,
        model_name: str,
        version: int | None,
        chunks: list[np.ndarray],
        on_response: Callable[[int, float], None] | None = None,
    ) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(chunks)
        errors: list[BaseException] = []
        slots = self._slots
        started: list[float] = [0.0] * len(chunks)
        done = threading.Event()
        remaining = [len(chunks)]
        lock = threading.Lock()

        def finish(index: int, result: Any, error: Any) -> None:
            try:
                if error is not None:
                    errors.append(_server_error(error, f"inference on {model_name!r} version {version or 'latest'}"))
                else:
                    results[index] = _as_embeddings(result.as_numpy(OUTPUT_NAME), chunks[index].shape[0])
                    if on_response is not None:
                        on_response(chunks[index].shape[0], time.perf_counter() - started[index])
            except BaseException as exc:  # noqa: BLE001 - surfaced to the caller below
                errors.append(exc)
            finally:
                slots.release()
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        for index, array in enumerate(chunks):
            slots.acquire()
            if errors:  # stop sending once one chunk failed; count the unsent ones as done
                slots.release()
                with lock:
                    remaining[0] -= len(chunks) - index
                    if remaining[0] == 0:
                        done.set()
                break
            inputs, outputs = self._inputs(array)
            started[index] = time.perf_counter()
            try:
                self._client.async_infer(
                    model_name,
                    inputs,
                    callback=lambda result, error, i=index: finish(i, result, error),
                    model_version=_version_str(version),
                    outputs=outputs,
                    client_timeout=self.timeout_s,
                )
            except BaseException as exc:
                finish(index, None, exc)
        if not done.wait(self.timeout_s * len(chunks) + 5.0):
            raise InferenceError(f"timed out waiting for {model_name!r} responses")
        if errors:
            first = errors[0]
            raise first if isinstance(first, InferenceError) else InferenceError(str(first))
        return [r for r in results if r is not None]

    def _model_shape(self, model_name: str, version: int | None) -> tuple[int, int]:
        """(max_batch_size, embedding dim) from the served config, cached until the next load."""
        with self._lock:
            cached = self._shapes.get(model_name)
        if cached is not None:
            return cached
        try:
            config = self._client.get_model_config(
                model_name, _version_str(version), as_json=True, client_timeout=self.timeout_s
            )
        except self._grpc_exception() as exc:
            raise _server_error(exc, f"reading the config of {model_name!r}") from exc
        body = config.get("config", {})
        size = int(body.get("max_batch_size", 0)) or 1
        outputs = {o.get("name"): o for o in body.get("output", [])}
        dims = outputs.get(OUTPUT_NAME, {}).get("dims", ["0"])
        shape = (size, int(dims[-1]))
        with self._lock:
            self._shapes[model_name] = shape
        return shape

    def _grpc_exception(self) -> type[BaseException]:
        from tritonclient.utils import InferenceServerException

        return InferenceServerException


def _version_str(version: int | None) -> str:
    return "" if version is None else str(int(version))


def _as_embeddings(array: np.ndarray | None, rows: int) -> np.ndarray:
    if array is None or array.ndim != 2 or array.shape[0] != rows:
        shape = None if array is None else list(array.shape)
        raise InferenceError(f"server returned embeddings of shape {shape} for {rows} images")
    return array.astype(np.float32, copy=False)


def _server_error(exc: Any, what: str) -> InferenceError:
    status = exc.status() if hasattr(exc, "status") else None
    message = exc.message() if hasattr(exc, "message") else str(exc)
    text = f"{what} failed: {message}" + (f" [{status}]" if status else "")
    # Triton answers UNAVAILABLE both for "no server" and for "model not ready": only the
    # message tells them apart, and the scorer reacts differently (back off vs. load).
    lowered = str(message).lower()
    if "not at ready state" in lowered or "unknown model" in lowered or "not found" in lowered:
        return ModelNotReadyError(text)
    if status == "StatusCode.UNAVAILABLE":
        return ServerUnavailableError(text)
    return InferenceError(text)


__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "EncoderModelSpec",
    "ExportError",
    "InferenceError",
    "ModelLoadError",
    "ModelNotReadyError",
    "ModelRepoError",
    "OnnxSignature",
    "ServerUnavailableError",
    "TritonEncoder",
    "discard_version",
    "export_encoder_onnx",
    "list_versions",
    "prune_versions",
    "read_onnx_signature",
    "render_config",
    "write_model_version",
]
