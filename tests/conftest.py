"""Shared fixtures: one local Ray per test module, with the small resources of a 2-core machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray for the whole module; the dashboard stays on (Tune needs it, see RAY-NOTES)."""
    ray.init(
        num_cpus=2,
        object_store_memory=512 * 2**20,
        include_dashboard=True,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()
