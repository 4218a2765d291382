import os
import tempfile

import pytest

# Set before transformers is imported: no Hub calls, and remote code copied into a throwaway modules cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="graftlm-hf-modules-"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    from testing_utils import save_tiny_gpt2

    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def matrix_exports(tmp_path_factory):
    """{architecture: exported folder}: tiny 64-wide conversions with their new modules opened (issue 6 matrix)."""
    from testing_utils import MATRIX_ARCHS, build_matrix_export

    return {arch: build_matrix_export(arch, tmp_path_factory.mktemp(f"matrix_{arch}")) for arch in MATRIX_ARCHS}
