from itertools import pairwise

import pytest

from medgpt.lr_schedule import warmup_cosine_factor


def test_warmup_then_cosine_to_min_ratio():
    factors = [warmup_cosine_factor(s, warmup_steps=4, total_steps=14, min_ratio=0.1) for s in range(16)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # no step runs at lr 0
    assert factors[4] == 1.0 and all(a > b for a, b in pairwise(factors[4:14]))
    assert factors[14] == pytest.approx(0.1) and factors[15] == pytest.approx(0.1)
    assert warmup_cosine_factor(0, warmup_steps=0, total_steps=10, min_ratio=0.0) == 1.0
