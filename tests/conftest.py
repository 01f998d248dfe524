"""Shared fixtures for the unit tests: the embedded model is loaded once per session."""
import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M on CPU in fp32."""
    from labkit import models

    return models.load("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]
