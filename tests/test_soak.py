"""A short soak (the long one is ``python -m benchmarks.soak``): random adapter operations on a
compiled tiny model, outputs checked against merged-weight references built from the files."""

from __future__ import annotations

import pytest

from benchmarks.soak import run_soak

pytestmark = pytest.mark.slow


def test_short_soak_no_mismatch_no_recompile(tmp_path) -> None:
    result = run_soak(operations=400, seed=3, check_every=4, workdir=tmp_path)
    print(result)
    assert result.checks == 100
    assert result.mismatches == 0 and result.max_diff <= 1e-4
    assert result.recompiles == 0
    assert result.rss_end_mb - result.rss_after_warmup_mb < 64  # no growth per operation
