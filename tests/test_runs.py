"""gen3d.runs.warmup_cosine: the learning-rate schedule shared by the few-shot teacher, encoder
pretraining and distillation (known values)."""
from __future__ import annotations

import math

import pytest

from distill.pretrain import learning_rate
from gen3d.runs import warmup_cosine


def test_warmup_cosine_known_values():
    # warm-up: (step + 1) / warmup
    assert [warmup_cosine(s, 10, 4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # cosine from 1 at the end of warm-up to min_ratio at total, held there afterwards
    assert warmup_cosine(4, 10, 4, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(7, 10, 4, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(10, 10, 4, 0.1) == pytest.approx(0.1) and warmup_cosine(50, 10, 4, 0.1) == pytest.approx(0.1)
    # no warm-up: step 0 is the full rate
    assert warmup_cosine(0, 25) == 1.0
    # pretraining: absolute min_lr
    train = {"lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 2, "steps": 12}
    assert learning_rate(0, train) == pytest.approx(5e-4) and learning_rate(12, train) == pytest.approx(1e-5)
