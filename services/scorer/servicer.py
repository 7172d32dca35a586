"""gRPC API `iex.v1.ScorerService`: rewards of ad-hoc images, which model serves an exploration, and
the stored embeddings of scored images."""

from __future__ import annotations

import hashlib
import logging

import grpc

from iex.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from services.common.errors import DependencyUnavailable
from services.common.modelrepo import InferenceError
from services.scorer import records
from services.scorer.engine import ScoringEngine
from services.scorer.metrics import SOURCE_API
from services.scorer.preprocess import ImageDecodeError, decode_image

log = logging.getLogger(__name__)

MAX_IMAGES_PER_REQUEST = 256
MAX_IMAGE_BYTES = 20 * 1024 * 1024
# 256 x 2048-d float32 is 2 MiB: under gRPC's default 4 MiB receive limit of a client.
MAX_EMBEDDINGS_PER_REQUEST = 256
_HEX = frozenset("0123456789abcdef")

SERVICE_NAME = scorer_pb2.DESCRIPTOR.services_by_name["ScorerService"].full_name


class ScorerServicer(scorer_pb2_grpc.ScorerServiceServicer):
    def __init__(self, engine: ScoringEngine) -> None:
        self.engine = engine

    def ScoreImages(self, request: scorer_pb2.ScoreImagesRequest, context: grpc.ServicerContext) -> scorer_pb2.ScoreImagesResponse:
        exploration_id = self._known_exploration(request.exploration_id, context)
        images = list(request.images)
        if not images:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "images: at least one image is required")
        if len(images) > MAX_IMAGES_PER_REQUEST:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"images: at most {MAX_IMAGES_PER_REQUEST} images per request, got {len(images)}")
        for index, data in enumerate(images):
            if len(data) > MAX_IMAGE_BYTES:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"images[{index}]: {len(data)} bytes exceeds the limit of {MAX_IMAGE_BYTES}")
            if not data:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"images[{index}]: empty")
        try:
            serving = self.engine.serving(exploration_id)
        except DependencyUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"encoder not available: {exc}")
        if serving is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"exploration_id: no model is serving for {exploration_id!r} yet")

        # Decode everything first (in parallel): a bad image is the caller's error and must be
        # reported as such before any Triton work is spent on the others.
        def decode(data: bytes):
            try:
                return decode_image(data, serving.image_size, max_pixels=self.engine.config.max_image_pixels)
            except ImageDecodeError as exc:
                return exc

        pixels = self.engine.map_io(decode, images)
        for index, decoded in enumerate(pixels):
            if isinstance(decoded, ImageDecodeError):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"images[{index}]: {decoded}")
        keys = ["sha256:" + hashlib.sha256(data).hexdigest() for data in images]

        def load(index: int):
            return pixels[index]

        try:
            embeddings, failures = self.engine.embed_items(serving, keys, load)
        except DependencyUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"encoder not available: {exc}")
        except InferenceError as exc:
            log.warning("inference failed", extra={"exploration_id": exploration_id, "error": str(exc)[:300]})
            context.abort(grpc.StatusCode.INTERNAL, "inference failed")
        if failures:  # unreachable: every item's pixels are already decoded
            index, failure = next(iter(failures.items()))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"images[{index}]: {failure}")
        rewards = self.engine.rewards(serving, embeddings)
        self.engine.metrics.images_scored.labels(source=SOURCE_API).inc(len(images))
        return scorer_pb2.ScoreImagesResponse(rewards=[float(r) for r in rewards], model=serving.ref())

    def GetServingModel(self, request: scorer_pb2.GetServingModelRequest, context: grpc.ServicerContext) -> scorer_pb2.GetServingModelResponse:
        exploration_id = self._known_exploration(request.exploration_id, context)
        # Answered from memory or from the persisted record: a status query never loads a model.
        state = self.engine.current(exploration_id)
        if state is not None:
            return scorer_pb2.GetServingModelResponse(model=state.ref(), target_bank_size=state.bank_size)
        try:
            record = self.engine.serving_record(exploration_id)
        except DependencyUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"object store not available: {exc}")
        if record is None:
            return scorer_pb2.GetServingModelResponse()
        return scorer_pb2.GetServingModelResponse(
            model=common_pb2.ModelRef(name=record.model_name, version=record.version),
            target_bank_size=record.target_bank_size,
        )

    def GetEmbeddings(self, request: scorer_pb2.GetEmbeddingsRequest, context: grpc.ServicerContext) -> scorer_pb2.GetEmbeddingsResponse:
        exploration_id = self._known_exploration(request.exploration_id, context)
        shas = list(request.pixel_sha256)
        if not shas:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "pixel_sha256: at least one is required")
        if len(shas) > MAX_EMBEDDINGS_PER_REQUEST:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"pixel_sha256: at most {MAX_EMBEDDINGS_PER_REQUEST} per request, got {len(shas)}")
        for index, sha in enumerate(shas):
            if len(sha) != 64 or not set(sha) <= _HEX:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"pixel_sha256[{index}]: not a lower-case hex sha256")
        name, version = request.model.name, int(request.model.version)
        if version < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model.version: must be >= 0, got {version}")
        if not name or version == 0:
            try:
                state = self.engine.current(exploration_id)
                record = None if state is not None else self.engine.serving_record(exploration_id)
            except DependencyUnavailable as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"object store not available: {exc}")
            served = (state.model_name, state.version) if state is not None else (record.model_name, record.version) if record else None
            if served is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"exploration_id: no model has served {exploration_id!r} yet")
            name = name or served[0]
            version = version or (served[1] if name == served[0] else 0)
            if version == 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model.version: required for model {name!r}, which does not serve this exploration")
        try:
            found = self.engine.embeddings.lookup(name, version, shas)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model: {exc}")
        except DependencyUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"object store not available: {exc}")
        response = scorer_pb2.GetEmbeddingsResponse(model=common_pb2.ModelRef(name=name, version=version))
        for sha in dict.fromkeys(shas):
            vector = found.get(sha)
            if vector is None:
                response.missing.append(sha)
            else:
                response.dimension = int(vector.shape[0])
                response.embeddings.add(pixel_sha256=sha, values=vector.tolist())
        return response

    def _known_exploration(self, exploration_id: str, context: grpc.ServicerContext) -> str:
        if not exploration_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "exploration_id: required")
        if not records.valid_exploration_id(exploration_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"exploration_id: {exploration_id[:80]!r} is not a valid id")
        try:
            known = self.engine.exploration(exploration_id) is not None
        except DependencyUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"object store not available: {exc}")
        if not known:
            context.abort(grpc.StatusCode.NOT_FOUND, f"exploration_id: unknown exploration {exploration_id!r}")
        return exploration_id


__all__ = ["MAX_EMBEDDINGS_PER_REQUEST", "MAX_IMAGES_PER_REQUEST", "MAX_IMAGE_BYTES", "SERVICE_NAME", "ScorerServicer"]
