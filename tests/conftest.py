"""Test-session settings: under pytest-xdist each worker gets an equal share of the cores.

Without this, torch starts one thread per core in every worker, and two workers on two cores run
four threads that slow each other down.
"""
import os

import torch


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
