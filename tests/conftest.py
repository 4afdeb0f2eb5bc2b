"""Shared test setup: the repository root on sys.path (tests import model.py, data.py, ... as a reader
would) and the fixtures in tests/fixtures/, reference outputs of the official implementations.

Both fixtures store no weights: every tensor is rebuilt from a rule seeded by its own name
(tests/fixtures/README.md), so the official FLM-Audio class and Kyutai's Mimi, run on those
weights, are the oracles for checkpoint compatibility.
"""
import json
import math
import shutil
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FLM_FIXTURE = FIXTURES / "flm-official-seeded"
MIMI_FIXTURE = FIXTURES / "mimi-seeded"


def seeded_flm_state():
    """The official-layout FLM-Audio weights of the fixture: 1-D norms 1 + 0.2 N, other 1-D 0.05 N,
    matrices 0.08 N, each drawn from a generator seeded by crc32 of the tensor's name."""
    out = {}
    for k, s in json.loads((FLM_FIXTURE / "keys.json").read_text()).items():
        g = torch.Generator().manual_seed(zlib.crc32(k.encode()))
        if len(s) == 1:
            norm = "norm" in k or "ln_" in k
            out[k] = (1 + 0.2 * torch.randn(s, generator=g)) if norm else 0.05 * torch.randn(s, generator=g)
        else:
            out[k] = 0.08 * torch.randn(s, generator=g)
    return out


def seeded_mimi_state():
    """Kyutai's Mimi weights of the fixture, by the rules in tests/fixtures/README.md."""
    out = {}
    for k, s in json.loads((MIMI_FIXTURE / "keys.json").read_text()).items():
        g = torch.Generator().manual_seed(zlib.crc32(k.encode()))
        if k.endswith("_initialized"):
            t = torch.ones(s)
        elif k.endswith("cluster_usage"):
            t = 1 + torch.rand(s, generator=g)
        elif k.endswith("embedding_sum"):
            t = torch.randn(s, generator=g)
        elif "layer_scale" in k:
            t = 0.01 + 0.01 * torch.rand(s, generator=g)
        elif "norm" in k and k.endswith("weight"):
            t = 1 + 0.1 * torch.randn(s, generator=g)
        elif k.endswith("bias"):
            t = 0.02 * torch.randn(s, generator=g)
        else:
            t = torch.randn(s, generator=g) / math.sqrt(math.prod(s[1:]))
        out[k] = t
    return out


@pytest.fixture(scope="session")
def official_dir(tmp_path_factory):
    """An official-layout checkpoint directory (config.json + model.safetensors) of the fixture."""
    d = tmp_path_factory.mktemp("flm-official-seeded")
    shutil.copy(FLM_FIXTURE / "config.json", d / "config.json")
    save_file(seeded_flm_state(), str(d / "model.safetensors"))
    return d


@pytest.fixture(scope="session")
def official_expected():
    return load_file(str(FLM_FIXTURE / "expected.safetensors"))


@pytest.fixture(scope="session")
def mimi_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mimi") / "seeded.safetensors"
    save_file(seeded_mimi_state(), str(path))
    return path
