"""The scorer's Triton client (services.common.modelrepo.TritonEncoder) against a fake gRPC client:
requests of the scorer's batch size, answered in order, latency reported per request, and one bound
on requests in flight shared by every thread of the replica."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")

from services.common import modelrepo as mr  # noqa: E402

DIM = 3


class _Result:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def as_numpy(self, name: str) -> np.ndarray:
        assert name == mr.OUTPUT_NAME
        return self.array


def _embeddings_of(images: np.ndarray) -> np.ndarray:
    """A stand-in model: the first pixel of each image, as floats (identifies the image)."""
    return images[:, 0, 0, :].astype(np.float32)


class FakeGrpcClient:
    """Answers async requests on timer threads after `delay_s`, recording how many overlap."""

    def __init__(self, delay_s: float = 0.02) -> None:
        self.delay_s = delay_s
        self.sizes: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def _start(self, images: np.ndarray) -> None:
        with self.lock:
            self.sizes.append(images.shape[0])
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _finish(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def infer(self, model_name, inputs, model_version="", outputs=None, client_timeout=None):
        [images] = inputs
        self._start(images)
        time.sleep(self.delay_s)
        self._finish()
        return _Result(_embeddings_of(images))

    def async_infer(self, model_name, inputs, callback, model_version="", outputs=None, client_timeout=None):
        [images] = inputs
        self._start(images)

        def answer() -> None:
            self._finish()
            callback(_Result(_embeddings_of(images)), None)

        threading.Timer(self.delay_s, answer).start()

    def close(self) -> None:
        pass


@pytest.fixture
def encoder():
    client = mr.TritonEncoder("127.0.0.1:1", max_in_flight=2, timeout_s=5.0)
    fake = FakeGrpcClient()
    client._client.close()
    client._client = fake
    client._inputs = lambda array: ([array], [])  # hand the fake the array itself
    client._shapes["m"] = (8, DIM)  # max_batch_size 8, as the served config would say
    yield client, fake


def _images(n: int) -> np.ndarray:
    images = np.zeros((n, 4, 4, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return images


def test_requests_follow_the_batch_size_and_come_back_in_order(encoder):
    client, fake = encoder
    observed: list[tuple[int, float]] = []
    images = _images(10)
    out = client.embed("m", 1, images, batch_size=3, on_response=lambda n, s: observed.append((n, s)))
    np.testing.assert_array_equal(out[:, 0], np.arange(10))
    assert sorted(fake.sizes) == [1, 3, 3, 3]
    assert sorted(n for n, _ in observed) == [1, 3, 3, 3]
    assert all(seconds >= fake.delay_s * 0.5 for _, seconds in observed)

    fake.sizes.clear()
    client.embed("m", 1, _images(20))  # default and ceiling: the model's max_batch_size
    assert sorted(fake.sizes) == [4, 8, 8]
    fake.sizes.clear()
    client.embed("m", 1, _images(20), batch_size=100)
    assert sorted(fake.sizes) == [4, 8, 8]
    observed.clear()
    client.embed("m", 1, _images(2), on_response=lambda n, s: observed.append((n, s)))  # one request: sync path
    assert [n for n, _ in observed] == [2]
    with pytest.raises(ValueError):
        client.embed("m", 1, _images(2), batch_size=0)


def test_one_in_flight_bound_for_every_thread(encoder):
    client, fake = encoder
    results: dict[int, np.ndarray] = {}

    def work(worker: int) -> None:
        images = _images(16)
        images[:, 0, 0, 1] = worker
        results[worker] = client.embed("m", 1, images, batch_size=2)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(fake.sizes) == 4 * 8
    # Four threads with eight requests each, never more than max_in_flight=2 at once in total.
    assert fake.max_in_flight == 2
    for worker, out in results.items():
        np.testing.assert_array_equal(out[:, 0], np.arange(16))
        assert np.all(out[:, 1] == worker)
