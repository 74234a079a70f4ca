"""The Celery peer: the same two steps as Celery tasks, chained.

The broker and result backend come from ``BENCH_CELERY_URL`` (a Redis URL).
"""

from __future__ import annotations

import os

import chain_services
from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_CELERY_URL"], backend=os.environ["BENCH_CELERY_URL"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="add_two")
def add_two(value: int) -> int:
    return chain_services.add_two(value)


@app.task(name="double")
def double(value: int) -> int:
    return chain_services.double(value)
