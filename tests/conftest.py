import os
import tempfile

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so it is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# DeepSpeed JIT-builds a small CPU op under a file lock in the torch extensions cache; a build killed
# earlier leaves the lock behind and every later run waits on it forever. A fresh folder per test session
# costs one build (~30 s) and is shared with the subprocesses (2-rank runs, notebooks) through the env.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="indexcache-torch-extensions-"))

# The distributed runs' ports are fixed offsets from a base, so that suites of two checkouts on one machine
# can run side by side: INDEXCACHE_TEST_PORT_BASE moves them all.
PORT_BASE = int(os.environ.get("INDEXCACHE_TEST_PORT_BASE", "29600"))


def port(offset: int) -> int:
    return PORT_BASE + offset


import pytest  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from indexcache_train.modeling import tiny_config  # noqa: E402


def build_tiny(model_type: str = "glm_moe_dsa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(params=["glm_moe_dsa", "deepseek_v32"])
def model_type(request):
    return request.param


@pytest.fixture
def input_ids():
    return torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
