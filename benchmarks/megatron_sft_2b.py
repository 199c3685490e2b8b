"""Megatron SFT throughput on a Qwen2-VL-2B-shaped model (random init, GPU): tokens/s and MFU.

    python benchmarks/megatron_sft_2b.py --out /tmp/mcore2b [--steps 8 --batch 16 --image-size 448]

Builds the checkpoint (Qwen2-VL-2B dimensions, the tiny model's tokenizer), a synthetic CoT set with
larger images, runs recipes/ume_sft_megatron.sh on one GPU, and reports the median tokens/s after
warm-up and MFU = 6 * N * tokens/s / peak, with N the language model's parameters (the frozen vision
tower's forward is left out, so the MFU is a slight under-estimate) and peak the dense bf16 rate.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
from pathlib import Path

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from ume_r1.data.processor import load_tokenizer
from ume_r1.data.template import ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START
from ume_r1.model.hf_checkpoint import add_ume_tokens
from ume_r1.model.qwen2_vl import SHAPES
from ume_r1.model.tiny import build_tiny_model
from ume_r1.synthetic.shapes_sft import make_synthetic_sft

REPO = Path(__file__).resolve().parent.parent
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_2b_shaped(out: Path, image_size: int) -> int:
    """Random Qwen2-VL-2B-shaped checkpoint; returns the language model's parameter count."""
    tiny = build_tiny_model(out.parent / "tiny-tokenizer-source", image_size=image_size)
    tokenizer = load_tokenizer(tiny)
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in (ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)
    }
    shape = SHAPES["2B"]
    config = Qwen2VLConfig(
        text_config=dict(
            **shape["text_config"],
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            bos_token_id=ids[ENDOFTEXT],
            eos_token_id=ids[IM_END],
            pad_token_id=ids[ENDOFTEXT],
        ),
        vision_config=shape["vision_config"],
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=shape["tie_word_embeddings"],
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    add_ume_tokens(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (Path(tiny) / "preprocessor_config.json").replace(out / "preprocessor_config.json")
    return sum(p.numel() for p in model.model.language_model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16, help="pairs per step")
    ap.add_argument("--image-size", type=int, default=448)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    n_params = build_2b_shaped(args.out / "model", args.image_size)
    data = make_synthetic_sft(
        str(args.out / "data"), n_train=max(64, args.batch), n_test=8, image_size=args.image_size
    )
    cmd = [
        "bash",
        "recipes/ume_sft_megatron.sh",
        f"model.path={args.out / 'model'}",
        f"data.train_files={data['train']}",
        f"train.total_steps={args.steps}",
        f"train.global_batch_size={args.batch}",
        "train.log_freq=1",
        f"output_dir={args.out / 'run'}",
        f"data.max_pixels={args.image_size**2}",
    ]
    print("$", " ".join(cmd), flush=True)
    log = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(log.stdout[-3000:], log.stderr[-3000:] if log.returncode else "")
    rows = [ast.literal_eval(line) for line in log.stdout.splitlines() if line.startswith("{'step'")]
    rates = [r["tokens_per_s"] for r in rows[2:]] or [r["tokens_per_s"] for r in rows]
    tps = statistics.median(rates)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    print(
        f"device {name}; language-model params {n_params / 1e9:.2f} B; steps {len(rows)}; "
        f"median tokens/s {tps:,.0f}; MFU {6 * n_params * tps / peak:.1%} "
        f"(peak {peak / 1e12:.0f} TFLOP/s bf16)"
    )


if __name__ == "__main__":
    main()
