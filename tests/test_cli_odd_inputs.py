"""The commands given odd inputs: a bad value, a --model that is no BERT checkpoint, an --out / --trace that
cannot be written, a --seq past the positions, a small vocabulary. Each is refused with one line naming it,
before the long work (never a traceback from deep inside, or an exit code 0 without the result)."""
import json
import re

import pytest
import torch

import bsbert
from bsbert import models
from bsbert.cli import main
from bsbert.errors import BsbertError
from tests.helpers import tiny_pruned


def _no_long_work(monkeypatch):
    """bench / sweep's first long steps raise: a test that gets past them did the work before refusing."""
    import bsbert.bench as bench

    def boom(*a, **k):
        raise AssertionError("the long work started before the input was refused")

    monkeypatch.setattr(bench, "dense_gemm_gflops", boom)
    monkeypatch.setattr(models, "dense_bert_large", boom)


def _exit(argv, capsys, code):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    return capsys.readouterr().err


def _bad_models(tmp_path):
    from transformers import GPT2Config, GPT2Model

    (tmp_path / "file").write_text("x")
    GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "bsbert.json").write_text("{}")  # what bsbert.save writes, no config.json
    (tmp_path / "cfgonly").mkdir()
    tiny_pruned().config.save_pretrained(tmp_path / "cfgonly")  # a config, no weights
    # the two below ended in raw tracebacks (safetensors' own error type; transformers' RuntimeError)
    model = tiny_pruned()
    model.save_pretrained(tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model.save_pretrained(tmp_path / "mismatch")
    model.config.intermediate_size = 256
    model.config.save_pretrained(tmp_path / "mismatch")
    return {"missing": "is not a directory (it does not exist)", "file": "is a file, not a checkpoint directory",
            "gpt2": "GPT2Model is not supported", "saved": "it is a bsbert.save directory: load it with bsbert.load",
            "cfgonly": "cannot load it as a Hugging Face checkpoint",
            "truncated": "cannot load it as a Hugging Face checkpoint: SafetensorError",
            "mismatch": "cannot load it as a Hugging Face checkpoint: RuntimeError"}


def test_load_local_names_what_is_wrong(tmp_path):
    for name, message in _bad_models(tmp_path).items():
        if name == "gpt2":  # loads: refused by analyze / patch, not by load_local
            continue
        with pytest.raises(BsbertError, match=re.escape(message)):
            models.load_local(str(tmp_path / name))


def test_bench_bad_model_refused_before_the_probes(tmp_path, monkeypatch, capsys):
    _no_long_work(monkeypatch)
    for name, message in _bad_models(tmp_path).items():
        err = _exit(["bench", "--device", "cpu", "--seq", "8", "--model", str(tmp_path / name),
                     "--out", str(tmp_path / "out")], capsys, 1)
        assert "bsbert bench: error: " in err and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv,message", [
    # --small shrank dense BERT-large (the baseline) but not the checkpoint: nonsense speedups
    (["bench", "--small", "--model", "."], "--small builds the seed-like model with 2 layers"),
    # refused by patch, but only after dense BERT-large and the packed model were timed
    (["bench", "--small", "--device", "cpu", "--select", "measure-gpu"],
     "--select: select='measure-gpu' times CUDA graphs: it needs a CUDA model"),
    # --model "$CKPT" with the variable unset ran the seed-like model
    (["bench", "--model", ""], "argument --model: empty path"),
    (["analyze", "--model", " "], "argument --model: empty path"),
    (["profile", "--model", ""], "argument --model: empty path"),
    (["profile", "--device", "cpu", "--trace", ""], "argument --trace: empty path"),
])
def test_flags_refused_before_the_work(argv, message, monkeypatch, capsys):
    _no_long_work(monkeypatch)
    err = _exit(argv, capsys, 2)
    assert message in err and "Traceback" not in err, err


def test_profile_trace_into_a_new_directory_refused_first(tmp_path, capsys):
    # abspath dropped the trailing slash, so the check passed and the run failed at its end ("wrote no trace")
    err = _exit(["profile", "--small", "--device", "cpu", "--trace", str(tmp_path / "newdir") + "/"], capsys, 2)
    assert "is a directory; give the trace file's path" in err


def test_analyze_bad_model_and_seq(tmp_path, capsys):
    err = _exit(["analyze", "--model", str(tmp_path / "missing")], capsys, 1)
    assert "bsbert analyze: error: model path" in err and "does not exist" in err
    for seq in ("0", "-5"):  # printed FLOPs of 0 and negative speedup bounds before
        assert "--seq: must be >= 1" in _exit(["analyze", "--seq", seq], capsys, 2)


@pytest.mark.parametrize("out", ["file", "file/sub"])
def test_bench_out_that_cannot_be_written_refused_first(out, tmp_path, monkeypatch, capsys):
    """--out was created only when writing the JSON, after the whole run."""
    _no_long_work(monkeypatch)
    (tmp_path / "file").write_text("x")
    err = _exit(["bench", "--small", "--device", "cpu", "--seq", "8", "--out", str(tmp_path / out)], capsys, 1)
    assert f"--out '{tmp_path / out}'" in err and "Traceback" not in err, err


def test_sweep_out_that_cannot_be_written_refused_first(tmp_path, monkeypatch, capsys):
    _no_long_work(monkeypatch)
    (tmp_path / "file").write_text("x")
    err = _exit(["bench", "--sweep", "--small", "--device", "cpu", "--seq", "8", "--batches", "1",
                 "--out", str(tmp_path / "file")], capsys, 1)
    assert "is a file, not a directory" in err, err


def test_bench_seq_past_the_positions_refused_first(tmp_path, monkeypatch, capsys):
    _no_long_work(monkeypatch)
    err = _exit(["bench", "--small", "--device", "cpu", "--seq", "128", "600", "--out", str(tmp_path)], capsys, 1)
    assert "--seq 600: the seed-like model takes sequences of at most 512 tokens" in err, err
    err = _exit(["bench", "--sweep", "--small", "--device", "cpu", "--seq", "513", "--out", str(tmp_path)],
                capsys, 1)
    assert "--seq 513: BERT-large takes sequences of at most 512 tokens" in err, err


def test_max_seq_len_counts_roberta_position_offset():
    import transformers as tf

    cfg = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    assert models.max_seq_len(tf.BertModel(tf.BertConfig(max_position_embeddings=64, **cfg))) == 64
    # RoBERTa numbers positions from padding_idx + 1 (pad_token_id 1): 2 of its 66 rows are never a position
    assert models.max_seq_len(tf.RobertaModel(tf.RobertaConfig(max_position_embeddings=66, **cfg))) == 64


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_bench_warmup_seconds_must_be_finite(value, monkeypatch, capsys):
    """inf warmed up forever; nan skipped the warm-up and went into the JSON as NaN."""
    import bsbert.bench as bench

    monkeypatch.setattr(bench, "run_bench", lambda **kw: pytest.fail(f"ran with warmup_s={kw['warmup_s']}"))
    assert "--warmup-s: must be a number of seconds >= 0" in _exit(["bench", f"--warmup-s={value}"], capsys, 2)


def test_bench_small_vocabulary_model(tmp_path):
    """A --model whose vocabulary is smaller than BERT-large's: the inputs were drawn from [1000, 30522), out of
    its embedding table (IndexError after the dense runs)."""
    from bsbert.bench import _inputs

    ids = _inputs(2, 16, 500, "cpu")["input_ids"]
    assert int(ids.min()) >= 250 and int(ids.max()) < 500
    model = tiny_pruned()  # vocab 1000
    model.config.architectures = ["BertForQuestionAnswering"]
    model.save_pretrained(tmp_path / "m")
    assert main(["bench", "--device", "cpu", "--model", str(tmp_path / "m"), "--seq", "8",
                 "--repeats", "1", "--trials", "1", "--warmup-s", "0", "--select", "heuristic",
                 "--out", str(tmp_path / "out")]) == 0
    res = json.loads(next((tmp_path / "out").glob("bench-*.json")).read_text())
    assert res["runs"][0]["max_rel_diff_patched"] <= 1e-4
    # the dense baseline is the checkpoint's own masked dense form, the architecture the bound's dense FLOPs count
    # (it was dense BERT-large, shrunk to 2 layers by --small, which the checkpoint ignored)
    assert res["dense_model"] == "the model unpatched (masked dense)"


@pytest.mark.parametrize("argv, message", [
    (["--seq", "0"], "--seq: must be >= 1, got 0"),
    (["--batch", "-1"], "--batch: must be >= 1, got -1"),
    (["--steps", "0"], "--steps: must be >= 1, got 0"),  # wrote an empty trace and exited 0
    (["--warmup", "-1"], "--warmup: must be >= 0, got -1"),
    (["--device", "tpu"], "--device 'tpu': not a torch device"),
])
def test_profile_rejects_bad_values(argv, message, capsys):
    from bsbert.profile import main as profile_main

    with pytest.raises(SystemExit) as exc:
        profile_main(["--small", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_profile_cuda_without_gpu_refused_before_building(monkeypatch, capsys):
    from bsbert.profile import main as profile_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "seed_like_model", lambda **k: pytest.fail("built the model first"))
    with pytest.raises(SystemExit) as exc:
        profile_main(["--small", "--device", "cuda"])
    assert exc.value.code == 2 and "torch sees no CUDA GPU here" in capsys.readouterr().err


def test_profile_seq_past_the_positions_refused_before_patch(monkeypatch, capsys):
    from bsbert.profile import main as profile_main

    monkeypatch.setattr(bsbert, "patch", lambda *a, **k: pytest.fail("patched first"))
    with pytest.raises(SystemExit) as exc:
        profile_main(["--small", "--device", "cpu", "--seq", "600"])
    assert exc.value.code == 1
    assert "--seq 600: the seed-like model takes sequences of at most 512 tokens" in capsys.readouterr().err


def test_profile_bad_model_is_one_line(tmp_path, capsys):
    from bsbert.profile import main as profile_main

    with pytest.raises(SystemExit) as exc:
        profile_main(["--device", "cpu", "--model", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "bsbert profile: error: model path" in err and "Traceback" not in err


def test_profile_trace_where_it_can_be_written(tmp_path, capsys):
    """torch.profiler's export writes nothing and raises nothing for a path it cannot write: profile said
    'Chrome trace: <path>' and exited 0. A missing directory is now created, a file in the way refused."""
    from bsbert.profile import main as profile_main

    (tmp_path / "file").write_text("x")
    for trace in (tmp_path / "file" / "t.json", tmp_path):
        with pytest.raises(SystemExit) as exc:
            profile_main(["--small", "--device", "cpu", "--trace", str(trace)])
        assert exc.value.code == 2 and "--trace" in capsys.readouterr().err
    trace = tmp_path / "new" / "t.json"
    assert profile_main(["--small", "--device", "cpu", "--seq", "8", "--steps", "1", "--warmup", "0",
                         "--trace", str(trace)]) == 0
    assert trace.is_file() and "bsbert/layer1" in trace.read_text()


def test_profile_small_vocabulary_model_shows_progress(tmp_path, capsys):
    """ids were drawn from [1000, vocab): a checkpoint of <= 1000 ids failed after patch; and the long build +
    patch of the default model ran without a word."""
    from bsbert.profile import main as profile_main

    model = tiny_pruned()  # vocab 1000
    model.save_pretrained(tmp_path / "m")
    assert profile_main(["--device", "cpu", "--model", str(tmp_path / "m"), "--seq", "8", "--steps", "1",
                         "--warmup", "0", "--trace", str(tmp_path / "t.json")]) == 0
    err = capsys.readouterr().err
    assert "bsbert profile: building" in err and "bsbert patch" in err and "profiled steps" in err


@pytest.mark.parametrize("value, note", [("AVX2", "BSBERT_CPU_ISA='AVX2' is not one of"),
                                         ("", "BSBERT_CPU_ISA='' is not one of")])
def test_info_says_when_the_isa_cap_is_ignored(value, note, monkeypatch):
    """The kernels ignore an unknown BSBERT_CPU_ISA (case matters); info showed the CPU's own level with no
    word that the cap the user set is not in effect."""
    from bsbert import _ext, info

    if _ext.load(warn=False) is None:
        pytest.skip("extension not built")
    monkeypatch.setenv("BSBERT_CPU_ISA", value)
    assert note in info.collect()["extension"]
    monkeypatch.setenv("BSBERT_CPU_ISA", "portable")
    assert "CPU ISA portable, capped by BSBERT_CPU_ISA=portable" in info.collect()["extension"]


@pytest.mark.parametrize("value, warned", [("AVX2", True), ("avx-512", True), ("avx2", False), ("portable", False)])
def test_import_warns_once_when_the_isa_cap_is_ignored(value, warned):
    """The kernels ignore an unknown BSBERT_CPU_ISA and run at the CPU's own level: a typo in a comparison run
    went unnoticed unless the user ran bsbert.info. Import now says so (a fresh interpreter: the extension
    loads once per process)."""
    import os
    import subprocess
    import sys

    from bsbert import _ext

    if _ext.load(warn=False) is None:
        pytest.skip("extension not built")
    r = subprocess.run([sys.executable, "-W", "always", "-c", "import bsbert; bsbert._ext.load()"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "BSBERT_CPU_ISA": value})
    assert r.returncode == 0, r.stderr
    assert (f"BSBERT_CPU_ISA={value!r} is not one of portable, avx2, avx512, avx512_bf16: ignored" in r.stderr) \
        == warned, r.stderr
    assert r.stderr.count("BSBERT_CPU_ISA") == (1 if warned else 0), r.stderr
