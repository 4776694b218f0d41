"""``vllm serve DIR`` (the OpenAI-compatible server) on an obdk checkpoint, on loopback only.

The tiny compressed Llama with its character tokenizer is served by the ``vllm`` command of this
venv (the plugin is found through its entry point; no flag names obdk), and one completion request
with a text prompt must return the text obdk's own transformers load generates greedily.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import obdk
from obdk.testing import make_char_tokenizer
from tests.vllm.conftest import VOCAB

PROMPT, NEW = "Hello, obdk!", 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (its engine core and workers), SIGKILL after 60 s."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone already
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_vllm_serve_completion(checkpoints, tmp_path):
    path = str(checkpoints["llama"])
    vllm_cli = Path(sys.executable).with_name("vllm")
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0-1")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(vllm_cli), "serve", path, "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "2",
                             "--served-model-name", "tiny-obdk"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{(tmp_path / 'serve.log').read_text()[-4000:]}")
            try:
                _get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("vllm serve did not come up in 600 s:\n" + (tmp_path / "serve.log").read_text()[-4000:])
                time.sleep(2)
        models = json.loads(_get(f"http://127.0.0.1:{port}/v1/models"))
        assert [m["id"] for m in models["data"]] == ["tiny-obdk"]
        body = json.dumps({"model": "tiny-obdk", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        _stop(proc)
        log.close()
    tok = make_char_tokenizer(VOCAB)
    ref = obdk.load_pretrained(path)
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        for _ in range(NEW):
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    want = tok.decode(ids[-NEW:], skip_special_tokens=True)
    assert answer["choices"][0]["text"] == want, answer
    assert answer["usage"]["completion_tokens"] == NEW
