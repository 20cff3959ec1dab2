"""CAGrad's and Nash-MTL's small solves run on one BLAS thread whatever the machine or executor: OpenBLAS sums in an
order that depends on its thread count, and with 2 BLAS threads a joint+cagrad run's logits differed from the same
run in a Ray worker (1 BLAS thread), torch at 1 thread in both."""
import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import regimes.cagrad as cagrad
import regimes.nash as nash


def blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_the_solves_see_one_blas_thread_even_when_the_process_allows_more(monkeypatch):
    if not blas_threads():
        pytest.skip("NumPy reports no BLAS thread pool here")
    seen = []
    real_minimize = __import__("scipy.optimize", fromlist=["minimize"]).minimize

    def recording_minimize(*args, **kwargs):
        seen.append(blas_threads())
        return real_minimize(*args, **kwargs)

    real_norm = np.linalg.norm

    def recording_norm(*args, **kwargs):
        seen.append(blas_threads())
        return real_norm(*args, **kwargs)

    rng = np.random.default_rng(0)
    g = rng.normal(size=(4, 50))
    gram = g @ g.T
    monkeypatch.setattr("scipy.optimize.minimize", recording_minimize)
    monkeypatch.setattr(nash.np.linalg, "norm", recording_norm)
    with threadpool_limits(limits=2, user_api="blas"):
        cagrad.simplex_weights(gram, 0.4)
        nash.bargaining_weights(gram)
    assert seen and all(threads == {1} for threads in seen)
