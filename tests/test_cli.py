"""``hotswap-rt inspect`` and ``hotswap-rt bench`` on local files (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hotswap_rt.cli import main

from .conftest import ATTENTION_TARGETS, BaseModel


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    base = BaseModel("llama", seed=71)
    root = tmp_path_factory.mktemp("cli")
    path = base.make_adapter(root / "a", seed=1, r=8, lora_alpha=16, rank_pattern={"v_proj": 4})
    base.model.config.save_pretrained(str(root / "model"))  # config only: inspect builds on meta
    return path, root / "model"


def test_inspect_reports_and_fits(adapter, capsys) -> None:
    path, model_dir = adapter
    assert main(["inspect", str(path), "--max-rank", "16", "--model", str(model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rank"] == 8 and report["rank_pattern"] == {"v_proj": 4}
    assert report["target_suffixes"] == sorted(ATTENTION_TARGETS["llama"])
    assert report["modules"] == 8 and report["fits"] is True and report["bytes"] > 0


def test_inspect_explains_why_it_does_not_fit(adapter, capsys) -> None:
    path, model_dir = adapter
    code = main(["inspect", str(path), "--max-rank", "4", "--target-modules", "q_proj", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and not report["fits"]
    assert any("rank 8 > --max-rank 4" in p for p in report["problems"])
    assert any("outside --target-modules" in p for p in report["problems"])
    code = main(["inspect", str(path), "--max-rank", "4", "--model", str(model_dir), "--json"])
    assert code == 1 and "max_rank=4" in " ".join(json.loads(capsys.readouterr().out)["problems"])


def test_inspect_holds_modules_to_save_and_builds_the_adapters_task_model(adapter, tmp_path,
                                                                           capsys) -> None:
    """An adapter training modules in full fits the model it was made for: ``lm_head`` on a
    causal LM, and a SEQ_CLS adapter's RoBERTa ``classifier`` head (its two linears) on a
    sequence classifier, built as its ``task_type`` says; ``bytes`` counts every tensor."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import RobertaConfig, RobertaForSequenceClassification

    _, model_dir = adapter
    base = BaseModel("llama", seed=72)
    head = base.make_adapter(tmp_path / "head", seed=2, r=4, modules_to_save=["lm_head"])
    config = RobertaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, num_labels=3, max_position_embeddings=64)
    config.save_pretrained(str(tmp_path / "roberta"))
    torch.manual_seed(0)
    peft_model = get_peft_model(RobertaForSequenceClassification(config),
                                LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    peft_model.save_pretrained(str(tmp_path / "cls"))
    cases = ((head, model_dir, ["lm_head"]),
             (tmp_path / "cls", tmp_path / "roberta", ["classifier.dense", "classifier.out_proj"]))
    for path, model, saved in cases:
        assert main(["inspect", str(path), "--max-rank", "8", "--model", str(model), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["fits"] is True and report["modules_to_save"] == saved
        state = load_file(str(path / "adapter_model.safetensors"))
        assert report["bytes"] == sum(t.nbytes for t in state.values())
    # the RoBERTa adapter against a Llama config: built as a Llama sequence classifier, refused
    assert main(["inspect", str(tmp_path / "cls"), "--model", str(model_dir), "--json"]) == 1
    assert "LlamaForSequenceClassification" in " ".join(json.loads(capsys.readouterr().out)["problems"])


def test_inspect_of_a_bad_adapter_is_a_clear_error(tmp_path, capsys) -> None:
    (tmp_path / "adapter_config.json").write_text("{not json")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_bench_on_the_default_model(capsys) -> None:
    assert main(["bench", "--rounds", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["swaps"] >= 3 and result["swap_ms"] > 0 and result["copy_ms"] > 0
    assert result["forward_overhead_vs_uninjected"] > 0 and result["device"] == "cpu"


def test_bad_command_line_values_are_clear_errors(adapter, tmp_path, capsys) -> None:
    """A model path that does not load is an error line, not a transformers traceback; counts
    must be positive (usage errors); ``--device cuda`` without CUDA says so."""
    path, _ = adapter
    missing = str(tmp_path / "no-model")
    assert main(["inspect", str(path), "--model", missing]) == 2
    assert f"--model {missing!r} does not load as a causal LM" in capsys.readouterr().err
    assert main(["bench", "--model", missing]) == 2
    assert "does not load as a causal LM" in capsys.readouterr().err
    bad_counts = (["inspect", str(path), "--max-rank", "0"], ["bench", "--rounds", "-1"],
                  ["demo", "--rounds", "x"])
    for argv in bad_counts:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err


def test_the_server_keeps_its_compile_cache_where_a_reboot_does_not_empty_it(tmp_path) -> None:
    """``--compile-cache``, else ``$TORCHINDUCTOR_CACHE_DIR``, else under ``$XDG_CACHE_HOME``
    (``~/.cache``), never inductor's temp-dir default; a real ``hotswap-rt serve`` (eager, so
    nothing compiles here) says which directory and whether it is warm, and answers."""
    import os

    from hotswap_rt.serve.compile_cache import compile_cache_dir

    assert compile_cache_dir("~/x", {"TORCHINDUCTOR_CACHE_DIR": "/y"}) == (Path.home() / "x").resolve()
    assert compile_cache_dir(None, {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "env"),
                                    "XDG_CACHE_HOME": "/z"}) == tmp_path / "env"
    assert compile_cache_dir(None, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == \
        tmp_path / "xdg" / "hotswap_rt" / "inductor"
    assert compile_cache_dir(None, {}) == Path.home() / ".cache" / "hotswap_rt" / "inductor"

    base_env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    for env, expected in [({**base_env, "XDG_CACHE_HOME": str(tmp_path / "xdg")},
                           tmp_path / "xdg" / "hotswap_rt" / "inductor"),  # the default
                          ({**base_env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "own")},
                           tmp_path / "own")]:  # the user's own, kept
        assert f"compile cache {expected} (unused: --no-compile)" in _serve_eagerly(env)
    # in a fresh process (it sets the process's TORCHINDUCTOR_CACHE_DIR): empty, then warm
    import subprocess
    import sys

    probe = ("import os; from hotswap_rt.serve.compile_cache import use_compile_cache; "
             "print(*use_compile_cache(None), os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    env = {**base_env, "XDG_CACHE_HOME": str(tmp_path / "fresh")}
    cache = tmp_path / "fresh" / "hotswap_rt" / "inductor"
    for warm in (False, True):
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == [str(cache), str(warm), str(cache)]
        (cache / "entry").parent.mkdir(parents=True, exist_ok=True)
        (cache / "entry").write_text("")


def _start_server(flags: list[str], env: dict[str, str]):
    """Start ``hotswap-rt serve *flags`` (stderr piped) on a free port and wait for /health:
    the process and its base URL (the process is ended if it never answers)."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "hotswap_rt.cli", "serve", *flags, "--port", str(port)],
                              env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.05)
    server.terminate()
    _, stderr = server.communicate(timeout=30)
    raise AssertionError(f"the server did not answer /health: {stderr[-3000:]}")


def _serve_eagerly(env: dict[str, str]) -> str:
    """Start ``hotswap-rt serve --no-compile`` with ``env``, wait for /health, stop it: its stderr."""
    server, _ = _start_server(["--no-compile"], env)
    server.terminate()
    _, stderr = server.communicate(timeout=30)
    return stderr


def test_compile_only_fills_the_cache_a_second_run_takes_every_graph_from(capsys) -> None:
    """``hotswap-rt serve --compile-only`` (the built-in model, a real process each time)
    compiles every bucket and exits 0 without listening; a second run on the same cache
    builds nothing (inductor's own cache counters, which it prints). Run on inductor's cache
    of this test process, so a warm suite does not compile here."""
    import os
    import re
    import subprocess
    import sys

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    command = [sys.executable, "-m", "hotswap_rt.cli", "serve", "--compile-only",
               "--compile-cache", cache_dir()]
    counts = []
    for _ in range(2):
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Uvicorn running" not in run.stderr and "listening" not in run.stderr
        found = re.search(r"--compile-only: (\d+) graphs from the cache, (\d+) built, (\d+) not cacheable",
                          run.stderr)
        assert found, run.stderr[-3000:]
        counts.append(tuple(int(n) for n in found.groups()))
    (hit, built, bypassed), (hit_again, built_again, bypassed_again) = counts
    assert hit + built >= 1 and bypassed == 0
    assert (hit_again, built_again, bypassed_again) == (hit + built, 0, 0)
    for flags, refused in ((["--no-compile"], "--no-compile"), (["--ray"], "--ray")):
        assert main(["serve", "--compile-only", *flags]) == 2
        assert f"--compile-only cannot be combined with {refused}" in capsys.readouterr().err


def test_serve_while_compiling_answers_before_its_graphs_are_compiled(tmp_path, capsys) -> None:
    """``hotswap-rt serve --serve-while-compiling`` (the built-in model, a real process, real
    HTTP, an empty compile cache): /health answers while /stats still says the graphs compile,
    completions are answered meanwhile (eagerly), and once compiled the same greedy completions
    come back unchanged, with nothing recompiled. Another process built the graphs first; the
    server's own compile took every one from the cache."""
    import os
    import re
    import time

    import httpx

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    server, url = _start_server(["--serve-while-compiling", "--compile-cache", str(tmp_path / "cache")], env)
    body = {"model": "hotswap-rt/tiny-llama", "prompt": "The cat", "max_tokens": 8, "temperature": 0}
    deadline = time.monotonic() + 420
    try:
        assert httpx.get(f"{url}/stats").json()["compile"]["state"] == "compiling"
        assert 'hotswap_compile_state{state="compiling"} 1.0' in httpx.get(f"{url}/metrics").text
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        eager = reply.json()["choices"][0]["text"]
        stats = httpx.get(f"{url}/stats").json()
        assert stats["compile"]["state"] == "compiling"  # answered before the graphs were ready
        while stats["compile"]["state"] == "compiling":  # no load meanwhile: the compile goes faster
            assert time.monotonic() < deadline, "the compile did not end"
            time.sleep(0.5)
            stats = httpx.get(f"{url}/stats").json()
        assert stats["compile"]["state"] == "compiled" and stats["compile"]["error"] is None
        assert 'hotswap_compile_state{state="compiled"} 1.0' in httpx.get(f"{url}/metrics").text
        compiled = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert compiled == eager  # eager and compiled greedy outputs agree
        stats = httpx.get(f"{url}/stats").json()
        assert stats["compiles"] >= 1 and stats["recompiles"] == 0
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=60)
    assert "answering with the eager forward until every graph is compiled" in stderr
    elsewhere = re.search(r"another process compiled in [\d.]+ s: 0 graphs from the cache, (\d+) built", stderr)
    assert elsewhere and int(elsewhere.group(1)) >= 1, stderr[-3000:]
    here = re.search(r"every bucket compiled in [\d.]+ s \((\d+) graphs from the compile cache, (\d+) built\)",
                     stderr)
    assert here and here.groups() == (elsewhere.group(1), "0"), stderr[-3000:]  # all built there
    refusals = ((["--compile-only"], "--compile-only cannot be combined with --serve-while-compiling"),
                (["--ray"], "not supported with --ray"),
                (["--no-compile"], "serve_while_compiling needs compile"),
                (["--stacked-mixes"], "cannot be combined with stacked_mixes"),
                (["--device", "cuda"], "serve_while_compiling runs on CPU only"))
    for flags, message in refusals:
        assert main(["serve", "--serve-while-compiling", *flags]) == 2
        assert message in capsys.readouterr().err


def test_a_server_stopped_while_compiling_ends_its_compile_process(tmp_path) -> None:
    """A ``--serve-while-compiling`` server stopped (SIGTERM) while the other process still
    builds its graphs (an empty cache) exits promptly and takes that process with it."""
    import os
    import re
    import time

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    server, _ = _start_server(["--serve-while-compiling", "--compile-cache", str(tmp_path / "cache")], env)
    seen = ""
    while (found := re.search(r"compiling in another process first \(pid (\d+)\)", seen)) is None:
        line = server.stderr.readline()
        assert line, f"the server ended before compiling: {seen[-3000:]}"
        seen += line
    child = int(found.group(1))
    os.kill(child, 0)  # it runs
    started = time.monotonic()
    server.terminate()
    _, rest = server.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert "the compile in another process was stopped" in seen + rest
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # killed; reaped by the server before it exited
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the compile process {child} outlived the server")


def test_the_tool_calling_flags_are_vllms_pair(capsys) -> None:
    """``--enable-auto-tool-choice --tool-call-parser hermes`` reach the config; one without
    the other, or a parser this server does not have, is a usage error (exit 2)."""
    import argparse

    from hotswap_rt.serve.cli import add_arguments, config_from_args, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]))
    assert config.auto_tool_parser() == "hermes"
    assert config_from_args(parser.parse_args([])).auto_tool_parser() is None
    assert config_from_args(parser.parse_args(["--reasoning-parser", "qwen3"])).reasoning_parser == "qwen3"
    assert run(parser.parse_args(["--enable-auto-tool-choice"])) == 2
    assert "go together" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--tool-call-parser", "granite"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    for name in ("llama3_json", "pythonic", "mistral"):
        args = parser.parse_args(["--enable-auto-tool-choice", "--tool-call-parser", name])
        assert config_from_args(args).auto_tool_parser() == name
