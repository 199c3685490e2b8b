"""The torchvision guard the install step arms in every interpreter of the environment: transformers'
Qwen2-VL processors (which vLLM uses) import in a fresh process, and only thanks to the guard where
torchvision's compiled ops cannot load beside this torch."""

from __future__ import annotations

import subprocess
import sys

from ume_r1.torchvision_guard import PTH_NAME


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_processors_import_in_a_fresh_interpreter():
    done = run(
        "import sys, torchvision, ume_r1.torchvision_guard as g\n"
        "from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor\n"
        "from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor\n"
        "assert not any(isinstance(f, g._FirstImportHook) for f in sys.meta_path), 'the hook stays armed'\n"
    )
    assert done.returncode == 0, f"is {PTH_NAME} installed (make setup)?\n{done.stderr[-3000:]}"


def test_the_guard_is_what_makes_torchvision_import():
    needed = run("import ume_r1.torchvision_guard as g; print(g.compiled_ops_load())")
    assert needed.returncode == 0, needed.stderr[-2000:]
    disarmed = run(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_FirstImportHook']\n"
        "import torchvision\n"
    )
    if needed.stdout.strip() == "True":  # a matching torch + torchvision: nothing to guard
        assert disarmed.returncode == 0, disarmed.stderr[-2000:]
    else:
        assert disarmed.returncode != 0 and "torchvision::nms" in disarmed.stderr
