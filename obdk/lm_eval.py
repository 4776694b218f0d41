"""The harness's own CLI on obdk checkpoints: ``python -m obdk.lm_eval <lm_eval arguments>``.

An obdk directory's ``config.json`` carries ``quantization_config.quant_method = "obdk"``;
``AutoModelForCausalLM.from_pretrained`` loads it only once ``import obdk`` has registered
obdk's transformers quantizer (:mod:`obdk.hf_integration`). A bare ``lm_eval --model hf`` does
not import obdk and fails on such a directory. This module imports obdk, registers one more
lm_eval model, then hands every argument to lm_eval's own command line
(``lm_eval.__main__.cli_evaluate``, the ``lm_eval``/``lm-eval`` console script)::

    python -m obdk.lm_eval --model hf --model_args pretrained=DIR,dtype=float32 \\
        --tasks arc_easy,piqa --device cpu --batch_size 8
    python -m obdk.lm_eval --model obdk --model_args pretrained=smollm2-135m --tasks hellaswag --limit 100

* ``--model hf``: the harness's ``HFLM`` exactly, loading ``DIR`` with
  ``AutoModelForCausalLM.from_pretrained`` (obdk directories, HF directories and hub ids).
* ``--model obdk`` (:class:`ObdkLM`): ``pretrained=`` is resolved by
  :func:`obdk.hub.load_model`, so a ``.gguf`` file and the alias ``smollm2-135m`` work too;
  ``dtype=`` and the CLI's ``--device`` are honoured, the other ``HFLM`` arguments pass through.

Local task data: when ``$OBDK_DATA_DIR`` (else ``../shared/data`` beside the repository) holds
``zeroshot/<task>/validation`` for a task named in ``--tasks`` and no ``--include_path`` is
given, the harness's task YAMLs pointed at those splits (:func:`obdk.zeroshot.local_task_yamls`)
are written to a temporary directory passed as ``--include_path``; a line on stderr names each
task so redirected and the split scored (``validation``; ARC's default is test). Set
``OBDK_LM_EVAL_LOCAL=0`` to keep the harness's own loading.
"""
from __future__ import annotations

import atexit
import os
import sys

import obdk  # noqa: F401  (registers the "obdk" quantizer with transformers)

__all__ = ["ObdkLM", "main"]


def _register():
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    @register_model("obdk")
    class ObdkLM(HFLM):
        """``--model obdk``: ``pretrained`` (alias, ``.gguf``, obdk or HF directory, hub id) loaded by
        :func:`obdk.hub.load_model` with ``dtype``/``device``; the rest are ``HFLM``'s arguments."""

        def __init__(self, pretrained: str, dtype: str | None = None, device: str | None = None, **kwargs):
            from .hub import load_model
            dev = device or "cpu"
            model, tok = load_model(pretrained, dtype=None if dtype in (None, "auto") else dtype, device=dev)
            kwargs.pop("tokenizer", None)
            super().__init__(pretrained=model, tokenizer=tok, **kwargs)

    return ObdkLM


ObdkLM = _register()


def _task_names(argv: list[str]) -> list[str]:
    names: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--tasks=") or a.startswith("-t="):
            names += a.split("=", 1)[1].split(",")
        elif a in ("--tasks", "-t"):
            j = i + 1
            while j < len(argv) and not argv[j].startswith("-"):
                names += argv[j].split(",")
                j += 1
            i = j - 1
        i += 1
    return [n.strip() for n in names if n.strip()]


def with_local_tasks(argv: list[str]) -> list[str]:
    """``argv`` with ``--include_path TMP`` added when local data exist for some of its ``--tasks``."""
    if os.environ.get("OBDK_LM_EVAL_LOCAL", "1").strip() in ("0", "false", "no", "off"):
        return argv
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    names = _task_names(argv)
    if not names:
        return argv
    from .zeroshot import _entry, _kind, local_task_yamls
    leaves: list[str] = []
    for n in names:
        try:
            _, e = _entry(n)
        except Exception:  # unknown names: the harness reports them itself
            continue
        leaves += sorted(e.tags) if _kind(e) == "TAG" else [n]
    from .scratch import new_store, remove_store
    tmp = new_store("obdk-lm-eval-tasks-", None, "obdk.lm_eval")  # removed at exit, and on SIGTERM/SIGHUP
    atexit.register(remove_store, tmp)
    written = local_task_yamls(leaves, None, tmp)
    if not written:
        return argv
    from .zeroshot import local_task_dir, resolve_root
    root = resolve_root(None)
    for t in written:
        print(f"obdk.lm_eval: {t}: scoring the local validation split {local_task_dir(t, root)}", file=sys.stderr)
    return argv + ["--include_path", tmp]


def main(argv: list[str] | None = None) -> None:
    """Run lm_eval's CLI on ``argv`` (default ``sys.argv[1:]``) with obdk imported."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = with_local_tasks(argv)
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval"] + argv
    cli_evaluate()


if __name__ == "__main__":
    main()
