"""Shared fixtures: deterministic torch, and log capture that works with ROS's `launch` imported."""

import contextlib
import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


@pytest.fixture
def captured_log():
    """`with captured_log("pi_policy.model.x") as log: ...`, then `log.text`: what that logger said, WARNING and up.

    The handler sits on the logger itself. caplog's sits on the root logger, which sees nothing once ROS's `launch`
    is imported (launch_testing's pytest plugin imports it): loggers created afterwards do not propagate.
    """

    @contextlib.contextmanager
    def capture(name: str, level: int = logging.WARNING):
        logger, handler = logging.getLogger(name), _Records()
        old_level = logger.level
        logger.addHandler(handler)
        logger.setLevel(level)
        try:
            yield handler
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)

    return capture
