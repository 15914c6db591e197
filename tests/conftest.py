import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so it is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
