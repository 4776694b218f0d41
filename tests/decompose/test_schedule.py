"""decompose_targets: on CPU workers the largest problems start first; the spectra come back in targets' order,
the same as one worker's up to rounding."""
from __future__ import annotations

import torch

from obdk.calibrate.stats import calibrate
from obdk.config import LowRankConfig
from obdk.decompose import schedule
from obdk.models import select_targets
from obdk.testing import make_tiny_llama


def _tiny_problem():
    """A one-layer tiny Llama in fp64 (q 64², k/v 32×64, o 64², gate/up 160×64, down 64×160), its obd config,
    statistics on two random windows and its targets."""
    model = make_tiny_llama(layers=1).double()
    cfg = LowRankConfig(method="obd", compute_dtype="float64")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    stats = calibrate(model, ids, stats=cfg.needed_stats, progress=False)
    return model, cfg, stats, select_targets(model, cfg)


def test_largest_first_on_workers_and_same_spectra_in_target_order(monkeypatch):
    model, cfg, stats, targets = _tiny_problem()
    seen = []
    real = schedule._run_chunks

    def spy(run, chunks, workers, bar):
        seen.append([[t.name for t in c] for c in chunks])
        yield from real(run, chunks, workers, bar)
    monkeypatch.setattr(schedule, "_run_chunks", spy)
    one, _ = schedule.decompose_targets(model, targets, stats, cfg, workers=1, progress=False)
    two, _ = schedule.decompose_targets(model, targets, stats, cfg, workers=2, progress=False)
    shape = {t.name: (t.m, t.n) for t in targets}
    cost = [sum(schedule._cost(*shape[n]) for n in c) for c in seen[1]]
    grouped = [[t.name for t in c] for c in schedule._decomposition_batches(targets, 1)]
    assert seen[0] == grouped  # one worker: shape groups in first-seen order, as before
    assert cost == sorted(cost, reverse=True) and cost[0] > cost[-1]  # two: longest first
    assert shape[seen[1][0][0]] in ((160, 64), (64, 160))
    assert list(one) == list(two) == [t.name for t in targets]
    for n in one:  # (one worker has two BLAS threads, each of two has one: equal up to summation order)
        torch.testing.assert_close(one[n].eigenvalues, two[n].eigenvalues, rtol=1e-9, atol=0)
        a, b = one[n].truncate(8, keep_dense_at_break_even=False), two[n].truncate(8, keep_dense_at_break_even=False)
        torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-9, atol=1e-12)


def test_finish_is_applied_in_the_worker_as_each_decomposition_ends(monkeypatch):
    """``finish(name, spectrum)`` runs right after each decomposition (before the next one starts on that worker),
    and what it returns is the result: the full-rank spectra are never all held at once."""
    model, cfg, stats, targets = _tiny_problem()
    events = []
    real = schedule.spectrum

    def spy(w, **kw):
        events.append("decompose")
        return real(w, **kw)
    monkeypatch.setattr(schedule, "spectrum", spy)

    def finish(name, sp):
        events.append(name)
        return sp.compact(3)
    full, _ = schedule.decompose_targets(model, targets, stats, cfg, workers=1, progress=False)
    events.clear()
    cut, _ = schedule.decompose_targets(model, targets, stats, cfg, workers=1, progress=False, finish=finish)
    assert events[0::2] == ["decompose"] * len(targets) and sorted(events[1::2]) == sorted(t.name for t in targets)
    assert list(cut) == [t.name for t in targets]
    for n, sp in cut.items():
        assert sp.factor_b.shape[-1] == 3 and torch.equal(sp.factor_b, full[n].factor_b[:, :3]), n
