"""Model loading and the tiny builder: a tiny checkpoint plain transformers reloads, built the same way
for the same seed; UME tokens initialised from their spelling in spare rows; local directories only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from ume_r1.data.template import (
    IMAGE_PAD,
    VIDEO_PAD,
)
from ume_r1.model.hf_checkpoint import add_ume_tokens, load_model
from ume_r1.model.tiny import _train_tiny_tokenizer, build_tiny_model


def test_tiny_model_reloads_with_plain_transformers(tiny_model_dir: str) -> None:
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert model.config.get_text_config().hidden_size <= 128
    vocab = tokenizer.get_vocab()
    assert "<disc_emb>" in vocab and "<gen_emb>" in vocab
    for tag in ("<disc_emb>", "<gen_emb>"):
        assert tokenizer(tag, add_special_tokens=False)["input_ids"] == [vocab[tag]]
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert model.config.image_token_id == vocab[IMAGE_PAD]
    assert model.config.video_token_id == vocab[VIDEO_PAD]


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a = load_file(str(Path(build_tiny_model(tmp_path / "a", seed=0)) / "model.safetensors"))
    b = load_file(str(Path(build_tiny_model(tmp_path / "b", seed=0)) / "model.safetensors"))
    c = load_file(str(Path(build_tiny_model(tmp_path / "c", seed=1)) / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], c[name]) for name in a)


def test_add_ume_tokens_initialises_from_spelling(tiny_model_dir: str) -> None:
    tokenizer = _train_tiny_tokenizer(512, [])
    assert "<disc_emb>" not in tokenizer.get_vocab() and "<gen_emb>" not in tokenizer.get_vocab()
    config = Qwen2VLConfig.from_pretrained(tiny_model_dir)
    config.text_config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    assert not model.config.tie_word_embeddings
    n = len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == n

    spellings = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("<disc_emb>", "<gen_emb>")}
    assert all(len(ids) > 1 for ids in spellings.values())
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    expected = {
        t: (old_in[ids].sum(0) / len(ids), old_out[ids].sum(0) / len(ids)) for t, ids in spellings.items()
    }

    ids = add_ume_tokens(model, tokenizer)
    assert sorted(ids.values()) == [n, n + 1]
    assert len(tokenizer) == n + 2
    new_in = model.get_input_embeddings().weight.detach()
    new_out = model.get_output_embeddings().weight.detach()
    grown = -(-(n + 2) // 128) * 128  # grows only because it must, to a multiple of 128
    assert new_in.shape[0] == grown and new_out.shape[0] == grown
    for tag, (want_in, want_out) in expected.items():
        assert tokenizer(tag, add_special_tokens=False)["input_ids"] == [ids[tag]]
        torch.testing.assert_close(new_in[ids[tag]], want_in, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(new_out[ids[tag]], want_out, rtol=1e-6, atol=1e-7)
    # Existing rows are untouched.
    assert torch.equal(new_in[:n], old_in) and torch.equal(new_out[:n], old_out)

    # A second call changes nothing.
    snapshot_in, snapshot_out = new_in.clone(), new_out.clone()
    assert add_ume_tokens(model, tokenizer) == ids
    assert len(tokenizer) == n + 2
    assert torch.equal(model.get_input_embeddings().weight.detach(), snapshot_in)
    assert torch.equal(model.get_output_embeddings().weight.detach(), snapshot_out)


def test_add_ume_tokens_uses_spare_rows_and_never_shrinks(tiny_model_dir: str) -> None:
    """A stock Qwen2-VL table is larger than its tokenizer: the new tokens take spare rows and the
    table keeps its size (shrinking it breaks tensor-parallel vocabulary sharding)."""
    tokenizer = _train_tiny_tokenizer(512, [])
    n = len(tokenizer)
    config = Qwen2VLConfig.from_pretrained(tiny_model_dir)
    config.text_config.vocab_size = n + 300
    model = Qwen2VLForConditionalGeneration(config)
    old_in = model.get_input_embeddings().weight.detach().clone()
    spelling = tokenizer("<gen_emb>", add_special_tokens=False)["input_ids"]
    ids = add_ume_tokens(model, tokenizer)
    new_in = model.get_input_embeddings().weight.detach()
    assert new_in.shape[0] == n + 300 and model.get_output_embeddings().weight.shape[0] == n + 300
    assert sorted(ids.values()) == [n, n + 1]
    torch.testing.assert_close(new_in[ids["<gen_emb>"]], old_in[spelling].mean(0))
    assert torch.equal(new_in[n + 2 :], old_in[n + 2 :])


def test_load_model_refuses_non_local_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads from a hub"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model("Qwen/Qwen2-VL-2B-Instruct")
