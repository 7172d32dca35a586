import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--compat",
        action="store_true",
        default=False,
        help="point the integration suite at production servers (Apache Kafka KRaft, MinIO) started by services.stack.compat",
    )
