"""Shared test fixtures."""

import os
from pathlib import Path
from typing import Callable

import pytest

# as the CLI does by default: the libraries' warnings stay quiet (and their handlers, created at import
# while some test captures stderr, never write to a stream that test has since closed)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker: N workers on N cores; more threads than cores makes OpenMP spin and crawl
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from s3server import s3_server  # noqa: F401  (a moto S3 server on 127.0.0.1, session-scoped)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# ---- tiny models of every family (simpletuner.testing.tiny), shared by all tests ----------
@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per test session for the tiny models. Under pytest-xdist every worker
    has its own basetemp inside the session's, so the parent is shared by all workers;
    builds there are atomic and locked, so each family is built once per session."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-models"


@pytest.fixture(scope="session")
def tiny_model(tiny_models_root: Path) -> Callable[..., Path]:
    """`tiny_model("sdxl")` -> folder of a tiny random pipeline (built on first use)."""
    from simpletuner.testing import tiny

    kit = tiny.TokenizerKit()  # tokenizers trained once per worker

    def get(family: str, seed: int = 0) -> Path:
        return tiny.build(family, tiny_models_root / f"{family}-seed{seed}", seed, tokenizers=kit)

    return get


@pytest.fixture(scope="session")
def tiny_models(tiny_model: Callable[..., Path]) -> dict[str, Path]:
    """Every family's tiny pipeline folder, by family name."""
    from simpletuner.testing.tiny import FAMILIES

    return {family: tiny_model(family) for family in FAMILIES}
