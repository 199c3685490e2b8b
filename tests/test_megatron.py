"""Megatron-core backend: HF <-> megatron weight mapping (CPU) and forward parity with HF (GPU)."""

from __future__ import annotations

import socket

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e '.[megatron]')")

from megatron.core import parallel_state  # noqa: E402

from sft.megatron.convert import fuse_qkv, hf_to_mcore, mcore_to_hf, split_qkv, tp_merge, tp_split  # noqa: E402
from sft.megatron.model import MegatronQwen2VL, build_gpt_model, transformer_config  # noqa: E402
from ume_r1.batch import mm_token_type_ids  # noqa: E402
from ume_r1.model import load_model  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def model_parallel():
    """Megatron's model-parallel state for a world of one (gloo on CPU, nccl on GPU), torn down after."""
    created = not torch.distributed.is_initialized()
    if created:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0
        )
    parallel_state.initialize_model_parallel(1, 1)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        torch.distributed.destroy_process_group()


def test_fuse_qkv_layout_is_per_group():
    # 4 query heads, 2 groups, head dim 1: rows are [q0 q1 k0 v0 | q2 q3 k1 v1]
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 4}
    q, k, v = torch.arange(4.0), torch.tensor([10.0, 11.0]), torch.tensor([20.0, 21.0])
    fused = fuse_qkv(q, k, v, cfg)
    assert fused.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (q, k, v), strict=True))


def test_hf_mcore_round_trip_is_exact(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    text = model.config.text_config
    hf_sd = model.state_dict()
    mc = hf_to_mcore(hf_sd, text)
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in mc
    assert not any(k.startswith("model.language_model.") for k in mc)
    assert any(k.startswith("model.visual.") for k in mc)  # vision passes through under HF names
    back = mcore_to_hf(mc, text)
    assert back.keys() == hf_sd.keys()
    for key, tensor in hf_sd.items():
        assert torch.equal(back[key], tensor), key
    assert all(
        torch.equal(a, b) for a, b in zip(tp_merge(tp_split(mc, 2)).values(), mc.values(), strict=True)
    )


def test_tied_embeddings_round_trip(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    hf_sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    mc = hf_to_mcore(hf_sd, model.config.text_config)
    assert "output_layer.weight" not in mc
    assert mcore_to_hf(mc, model.config.text_config).keys() == hf_sd.keys()


def test_mcore_state_dict_loads_strictly_into_gptmodel(tiny_model_dir, model_parallel):
    model, _ = load_model(tiny_model_dir)
    text = model.config.text_config
    lm = {k: v for k, v in hf_to_mcore(model.state_dict(), text).items() if not k.startswith("model.")}
    gpt = build_gpt_model(text, tied=False, mrope=torch.cuda.is_available())
    expected = {k for k in gpt.state_dict() if not k.endswith("_extra_state")}
    assert expected == set(lm)
    extra = {k: v for k, v in gpt.state_dict().items() if k.endswith("_extra_state")}
    gpt.load_state_dict({**lm, **extra}, strict=True)
    for key, tensor in gpt.state_dict().items():
        if key in lm:
            assert torch.equal(tensor, lm[key]), key
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = MegatronQwen2VL.from_hf(model, transformer_config(text))  # takes the HF model apart
    exported = wrapped.hf_state_dict()
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], v) for k, v in reference.items())


def _image_batch(model_dir: str):
    from PIL import Image

    from ume_r1.model import load_image_processor
    from ume_r1.template import IMAGE_PAD, VISION_END, VISION_START

    _, tokenizer = load_model(model_dir)
    processor = load_image_processor(model_dir)
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    media = processor(images=[image], return_tensors="pt")
    n_pad = int(media["image_grid_thw"].prod()) // 4
    text = "describe the image " + VISION_START + IMAGE_PAD * n_pad + VISION_END + " a red square"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    return ids, dict(media)


def _hf_logits(model, ids: torch.Tensor, mask: torch.Tensor, media: dict) -> torch.Tensor:
    cfg = model.config
    types = mm_token_type_ids(ids, cfg.image_token_id, cfg.video_token_id)
    return model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, **media).logits.float()


@pytest.mark.gpu
def test_logits_match_hf(tiny_model_dir, model_parallel):
    model, _ = load_model(tiny_model_dir, device="cuda")
    ids, media = _image_batch(tiny_model_dir)
    ids, media = ids.cuda(), {k: v.cuda() for k, v in media.items()}
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = _hf_logits(model, ids, mask, media)
        mc = MegatronQwen2VL.from_hf(model, transformer_config(model.config.text_config)).cuda().eval()
        hidden, logits = mc(ids, mask, **media)
    assert hidden.shape[:2] == ids.shape
    torch.testing.assert_close(logits.float(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_tp1_forward_backward_smoke(tiny_model_dir, model_parallel):
    model, _ = load_model(tiny_model_dir, device="cuda")
    ids, media = _image_batch(tiny_model_dir)
    mc = MegatronQwen2VL.from_hf(model, transformer_config(model.config.text_config)).cuda()
    ids = torch.cat([ids, ids]).cuda()
    media = {k: torch.cat([v, v]).cuda() for k, v in media.items()}
    hidden, logits = mc(ids, torch.ones_like(ids), **media)
    logits.float().logsumexp(-1).mean().backward()
    assert torch.isfinite(hidden).all()
    assert mc.gpt.embedding.word_embeddings.weight.grad is not None


def test_train_config_and_pipeline_guard():
    from sft.megatron.train import load_config, train

    cfg = load_config(["megatron.tensor_model_parallel_size=2", "model.path=/x"])
    assert cfg.megatron.tensor_model_parallel_size == 2 and cfg.megatron.pipeline_model_parallel_size == 1
    with pytest.raises(ValueError, match="pipeline_model_parallel_size=1"):
        train(load_config(["megatron.pipeline_model_parallel_size=2"]))


@pytest.mark.gpu
def test_left_padded_batch_matches_hf(tiny_model_dir, model_parallel):
    model, _ = load_model(tiny_model_dir, device="cuda")
    ids, media = _image_batch(tiny_model_dir)
    pad = model.config.text_config.pad_token_id
    ids = torch.cat([torch.full((1, 3), pad), ids], dim=1).cuda()
    mask = (torch.arange(ids.shape[1]) >= 3).long()[None].cuda()
    media = {k: v.cuda() for k, v in media.items()}
    with torch.no_grad():
        ref = _hf_logits(model, ids, mask, media)
        mc = MegatronQwen2VL.from_hf(model, transformer_config(model.config.text_config)).cuda().eval()
        _, logits = mc(ids, mask, **media)
    torch.testing.assert_close(logits.float()[:, 3:], ref[:, 3:], atol=1e-4, rtol=1e-4)
