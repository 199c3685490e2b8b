"""The Qwen2-VL-2B shape with the real tokenizer (`ume_r1.model.qwen2_vl`, two decoder layers): the
tokenizer's ids, the UME tokens in the table's spare rows with the tie kept, the HF export of a tied
model, the template, stop ids and format check on real-tokenizer text, and a real-size video."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

from ume_r1.data.processor import load_tokenizer
from ume_r1.data.rows import Side
from ume_r1.data.template import DISC_EMB, GEN_EMB, UME_TOKENS, assistant_text, chat_prompt, format_ok
from ume_r1.model.hf_checkpoint import write_hf_checkpoint
from ume_r1.model.qwen2_vl import SPECIAL_TOKENS
from ume_r1.rollout.engine import special_ids, trim_at_stop

TABLE = "model.embed_tokens.weight"  # the name a tied Qwen2-VL checkpoint stores its one table under


def test_the_rebuilt_tokenizer_has_qwen2_vl_ids(qwen2_vl_dir):
    tok = load_tokenizer(qwen2_vl_dir)  # as saved and reloaded
    assert len(tok) == 151_657
    assert tok("Hello")["input_ids"] == [9707] and tok(" world")["input_ids"] == [1879]
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(151_643, 151_657))
    assert (tok.eos_token_id, tok.pad_token_id) == (151_645, 151_643)
    assert tok("caf\u00e9")["input_ids"] == tok("cafe\u0301")["input_ids"]  # NFC before BPE
    assert all(t not in tok.get_vocab() for t in UME_TOKENS)  # a stock checkpoint lacks them


def test_ume_tokens_take_spare_rows_of_the_tied_table(qwen2_vl_dir, qwen2_vl):
    stock_tok = load_tokenizer(qwen2_vl_dir)
    stock = load_file(Path(qwen2_vl_dir) / "model.safetensors")[TABLE].float()
    processor, model = qwen2_vl
    tok = processor.tokenizer
    assert {t: tok.convert_tokens_to_ids(t) for t in UME_TOKENS} == {DISC_EMB: 151_657, GEN_EMB: 151_658}
    table = model.get_input_embeddings().weight
    assert table.shape == (151_936, 1536)  # the table never grows: 277 rows were spare
    assert model.get_output_embeddings().weight.data_ptr() == table.data_ptr()  # still tied
    for token in UME_TOKENS:  # each new row is the mean of the rows that spell the tag
        pieces = stock_tok(token, add_special_tokens=False)["input_ids"]
        assert len(pieces) > 1
        torch.testing.assert_close(table[tok.convert_tokens_to_ids(token)], stock[pieces].mean(0))
    others = torch.ones(len(table), dtype=torch.bool)
    others[[151_657, 151_658]] = False
    assert torch.equal(table[others], stock[others])


def test_hf_export_of_the_tied_model_stores_one_table(qwen2_vl_dir, qwen2_vl, tmp_path):
    processor, model = qwen2_vl
    out = write_hf_checkpoint(
        model.state_dict(), model.config, processor.tokenizer, qwen2_vl_dir, tmp_path / "hf"
    )
    with safe_open(Path(out) / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert TABLE in names and "lm_head.weight" not in names
    again = Qwen2VLForConditionalGeneration.from_pretrained(out)
    assert again.get_output_embeddings().weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(again.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert load_tokenizer(out).convert_tokens_to_ids(GEN_EMB) == 151_658


def test_template_stop_ids_and_format_on_real_tokenizer_text(qwen2_vl_dir, qwen2_vl):
    processor, _ = qwen2_vl
    tok = processor.tokenizer
    prompt = processor.encode(Side(text="a red circle")).input_ids
    assert prompt == tok(chat_prompt("a red circle"), add_special_tokens=False)["input_ids"]
    assert prompt.count(151_657) == 1  # <disc_emb>: one token, once
    assert prompt.count(151_658) == 1  # the instruction names <gen_emb>; the response's is the embedding
    eos = GenerationConfig.from_pretrained(qwen2_vl_dir).eos_token_id
    stop, suppressed = special_ids(tok, eos, 151_936)
    assert stop == [151_658, 151_645, 151_643]  # <gen_emb>, <|im_end|>, <|endoftext|>
    assert sorted(suppressed) == [
        151_652,
        151_653,
        151_655,
        151_656,
        *range(151_659, 151_936),
    ]  # vision, spare
    response = assistant_text("The image shows one red circle.", "a red circle")
    ids = tok(response, add_special_tokens=False)["input_ids"]
    assert all(len(tok(tag, add_special_tokens=False)["input_ids"]) > 1 for tag in ("<think>", "<answer>"))
    assert ids[-1] == 151_658 and ids.count(151_658) == 1
    assert trim_at_stop([*ids, 13, 151_645], stop) == ids
    assert tok.decode(ids) == response and format_ok(tok.decode(ids))


def test_a_32_frame_video_fits_the_default_prompt(qwen2_vl):
    """At Qwen2-VL's defaults a video has a budget of its own: 32 frames of 1280 x 720 share 3,584
    merged patches and fit the default max_prompt_length (4,096) with the template and text. Sized as
    images (the layout before), the same frames would take about 19k tokens."""
    processor, _ = qwen2_vl
    frames = [Image.new("RGB", (1280, 720), (8 * i, 100, 50)) for i in range(32)]
    encoded = processor.encode(Side("what happens in this clip?", video=frames))
    video_tokens = encoded.input_ids.count(processor.video_pad_id)
    assert len(encoded.input_ids) <= 4096 and 3000 < video_tokens <= 3584
    assert encoded.video_grid_thw[0, 0] == 16  # 32 frames in pairs (temporal patch 2)
    width, height = processor.resized(frames[0]).size
    assert 16 * (width // 28) * (height // 28) > 18_000
