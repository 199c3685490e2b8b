"""Megatron-core backend: HF <-> megatron weight mapping (CPU) and forward parity with HF (GPU)."""

from __future__ import annotations

import shutil
import socket

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install -e '.[megatron]')")

from megatron.core import parallel_state  # noqa: E402

from sft.megatron.convert import fuse_qkv, hf_to_mcore, mcore_to_hf, split_qkv, tp_merge, tp_split  # noqa: E402
from sft.megatron.model import MegatronQwen2VL, build_gpt_model, transformer_config  # noqa: E402
from ume_r1.data.collate import mm_token_type_ids
from ume_r1.model.hf_checkpoint import load_model, write_hf_checkpoint


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
    mc = hf_to_mcore(hf_sd, text, tied=False)
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in mc
    assert not any(k.startswith("model.language_model.") for k in mc)
    assert any(k.startswith("model.visual.") for k in mc)  # vision passes through under HF names
    back = mcore_to_hf(mc, text, tied=False)
    assert back.keys() == hf_sd.keys()
    for key, tensor in hf_sd.items():
        assert torch.equal(back[key], tensor), key
    assert all(
        torch.equal(a, b) for a, b in zip(tp_merge(tp_split(mc, 2)).values(), mc.values(), strict=True)
    )


def test_tied_model_round_trip_keeps_one_table(tied_model_dir, model_parallel, tmp_path):
    """A tied model's HF state dict lists lm_head.weight (the embedding's tensor). Megatron must share
    the embedding, not build an output layer from it, and the export must name one table that
    transformers ties again on load (two tensors would reload untied: rollout and learner disagree)."""
    model, tokenizer = load_model(tied_model_dir)
    text = model.config.text_config
    assert "lm_head.weight" in model.state_dict()
    assert "output_layer.weight" not in hf_to_mcore(model.state_dict(), text, tied=True)
    wrapped = MegatronQwen2VL.from_hf(model, transformer_config(text))
    assert wrapped.gpt.share_embeddings_and_output_weights
    assert "output_layer.weight" not in wrapped.gpt.state_dict()
    table = wrapped.gpt.embedding.word_embeddings.weight
    with torch.no_grad():
        table[7] += 0.5  # what training does to the one table
    out = write_hf_checkpoint(
        wrapped.hf_state_dict(), wrapped.hf_config, tokenizer, tied_model_dir, tmp_path / "hf"
    )
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    reloaded, _ = load_model(out)
    embed, head = reloaded.get_input_embeddings().weight, reloaded.get_output_embeddings().weight
    assert head.data_ptr() == embed.data_ptr()
    assert torch.equal(embed, table.detach())


def test_mcore_state_dict_loads_strictly_into_gptmodel(tiny_model_dir, model_parallel):
    model, _ = load_model(tiny_model_dir)
    text = model.config.text_config
    lm = {
        k: v
        for k, v in hf_to_mcore(model.state_dict(), text, tied=False).items()
        if not k.startswith("model.")
    }
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

    from ume_r1.data.processor import load_image_processor
    from ume_r1.data.template import IMAGE_PAD, VISION_END, VISION_START

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


def _adamw_with_state(model: MegatronQwen2VL, seed: int) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters after two steps on fake gradients; the first
    parameter never gets a gradient, so it has no optimizer state."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1 / (s + 1))
    for _ in range(2):
        for p in params[1:]:
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        optim.step(), sched.step()
    return optim


def test_megatron_state_round_trip_is_exact(tiny_model_dir, model_parallel, tmp_path):
    from sft.megatron.checkpoint import load_megatron_state, save_megatron_state

    def build() -> MegatronQwen2VL:
        hf, _ = load_model(tiny_model_dir)
        model = MegatronQwen2VL.from_hf(hf, transformer_config(hf.config.text_config))
        model.model.visual.blocks[0].requires_grad_(False)  # frozen: in the checkpoint, not the optimizer
        return model

    model = build()
    optim = _adamw_with_state(model, seed=0)
    save_megatron_state(tmp_path / "ckpt", model, optim)
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"metadata.json", ".metadata", "common.pt"} <= files, files

    fresh = build()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh_optim = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=5.0)
    load_megatron_state(tmp_path / "ckpt", fresh, fresh_optim)

    saved, loaded = model.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys()
    for key, tensor in saved.items():
        if torch.is_tensor(tensor):
            assert tensor.dtype == loaded[key].dtype and torch.equal(tensor, loaded[key]), key
    saved, loaded = optim.state_dict(), fresh_optim.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]  # lr, initial_lr, betas, weight decay
    assert saved["state"].keys() == loaded["state"].keys() and 0 not in loaded["state"]
    for index, state in saved["state"].items():
        assert state.keys() == loaded["state"][index].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name, tensor in state.items():
            other = loaded["state"][index][name]
            assert tensor.dtype == other.dtype and torch.equal(tensor, other), (index, name)
    assert float(loaded["state"][1]["step"]) == 2.0


def _cpu_forward(model, pairs, ids, pad_id, device) -> dict[str, torch.Tensor]:
    """A stand-in for `forward_pairs` (megatron-core's decoder forward is CUDA-only): word embeddings
    scaled by the final norm's weight, so that two parameters train and the rest keep no optimizer state."""
    from ume_r1.data.collate import pack_sequences

    batch = pack_sequences(pairs.prompts, pairs.responses, pad_id)
    gpt = model.gpt
    hidden = gpt.embedding.word_embeddings(batch["input_ids"]) * gpt.decoder.final_layernorm.weight
    width = batch["responses"].shape[1]
    return {
        "log_probs": -hidden[:, -width:].pow(2).mean(-1),
        "mask": batch["response_mask"].float(),
        "gen": torch.nn.functional.normalize(hidden[:, -1], dim=-1),
        "disc": torch.nn.functional.normalize(hidden[:, 0], dim=-1),
    }


def _run_train(monkeypatch, overrides: list[str]) -> dict:
    """sft.megatron.train.train in this process, as rank 0 of a world of one."""
    from sft.megatron.train import load_config, train

    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    return train(load_config(overrides))


def _check_resume_matches_uninterrupted(monkeypatch, capsys, tmp_path, model_dir, train_file, exact):
    """6 steps with a checkpoint every 2 (the newest 2 kept), against a run that starts from the first
    run's step-4 checkpoint alone (as if killed during step 5): same last metrics, same HF export."""
    from safetensors.torch import load_file

    from ume_r1.training.checkpoint import LATEST

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"

    def overrides(out_dir):
        return [
            f"model.path={model_dir}",
            f"data.train_files={train_file}",
            "data.max_length=512",
            "data.max_pixels=3136",
            "data.dataloader_num_workers=1",
            "train.global_batch_size=4",
            "train.total_steps=6",
            "train.save_freq=2",
            "train.max_ckpt_to_keep=2",
            "train.lr=1e-3",
            "train.dtype=float32",
            "train.log_freq=1",
            f"output_dir={out_dir}",
        ]

    last = _run_train(monkeypatch, overrides(whole))
    assert sorted(p.name for p in whole.glob("global_step_*")) == ["global_step_4", "global_step_6"]
    assert (whole / LATEST).read_text() == "6"
    assert (whole / "global_step_4" / "megatron" / "metadata.json").is_file()

    shutil.copytree(whole / "global_step_4", resumed / "global_step_4")
    (resumed / LATEST).write_text("4")
    (resumed / "global_step_6.tmp").mkdir()  # an interrupted save: removed on start
    capsys.readouterr()
    again = _run_train(monkeypatch, overrides(resumed))
    assert "(step 4)" in capsys.readouterr().out
    assert not (resumed / "global_step_6.tmp").exists()
    assert (resumed / LATEST).read_text() == "6"

    timed = ("tokens_per_s",)
    assert last["step"] == again["step"] == 6
    a = {k: v for k, v in last.items() if k not in timed}
    b = {k: v for k, v in again.items() if k not in timed}
    w, r = load_file(whole / "hf" / "model.safetensors"), load_file(resumed / "hf" / "model.safetensors")
    assert w.keys() == r.keys()
    if exact:
        assert a == b
        assert all(torch.equal(w[k], r[k]) for k in w)
    else:  # CUDA kernels (atomics in the embedding backward) need not repeat bit for bit
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
        for key in w:
            torch.testing.assert_close(r[key], w[key], rtol=1e-4, atol=1e-5)


def test_train_resume_bookkeeping_cpu(tiny_model_dir, sft_dir, tmp_path, monkeypatch, capsys):
    """The checkpoint/resume path of train() on CPU, with the CUDA-only forward replaced."""
    import sft.megatron.train as megatron_train

    monkeypatch.setattr(megatron_train, "forward_pairs", _cpu_forward)
    _check_resume_matches_uninterrupted(
        monkeypatch, capsys, tmp_path, tiny_model_dir, sft_dir["train"], exact=True
    )


@pytest.mark.gpu
def test_train_resume_matches_uninterrupted(tiny_model_dir, sft_dir, tmp_path, monkeypatch, capsys):
    _check_resume_matches_uninterrupted(
        monkeypatch, capsys, tmp_path, tiny_model_dir, sft_dir["train"], exact=False
    )
