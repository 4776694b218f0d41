"""What the benchmark scripts share; each module has one job.

* :mod:`.env` — provenance stamped on every CSV row (device, versions, git SHA, load average),
  the repository root, the thread count;
* :mod:`.timing` — medians of repeated calls (``bench``, ``bench_interleaved``), device sync,
  freeing memory between runs, the process's peak RSS;
* :mod:`.rows` — CSV output: ``write_csv`` (union header), ``ResultLog`` (rows written one at a
  time, ``--resume`` by key columns), ``read_rows``, ``print_table``;
* :mod:`.models` — the one model loader (``tiny``, ``smollm2-135m``, hub specs, random Llama
  shapes);
* :mod:`.data` — the data directory, the evaluation token streams (WikiText-2, C4) and the
  calibration windows held out from them;
* :mod:`.sweep` — the keep sweep: apply each keep (or dict of ``Plan.apply`` overrides) to a
  fresh copy of the model, time it, hand it to the caller to evaluate and write a row.
"""
