"""Session-wide fixtures shared by every test folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory) -> str:
    """One SVDA_HOME for every real-model test, so the GGUF is converted once per session."""
    return str(tmp_path_factory.mktemp("svda-home"))


@pytest.fixture(scope="session")
def smollm2(smollm2_home):
    """The embedded SmolLM2-135M-Instruct, converted into the session's SVDA_HOME."""
    from svda.runtime import load_base_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SVDA_HOME", smollm2_home)
        yield load_base_model()
