"""Each synthetic set's command line writes its files and names them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SMALL = ["--n-train", "4", "--n-test", "4"]


@pytest.mark.parametrize(
    ("module", "args", "files"),
    [
        ("ume_r1.synthetic.shapes", SMALL, ["train.parquet", "test.parquet"]),
        ("ume_r1.synthetic.shapes_sft", SMALL, ["sft_train.parquet", "sft_test.parquet"]),
        (
            "ume_r1.synthetic.reasoning",
            [*SMALL, "--n-sft-train", "4"],
            ["train.parquet", "test.parquet", "sft_train.parquet", "sft_test.parquet"],
        ),
    ],
)
def test_synthetic_command_writes_and_names_its_files(
    module: str, args: list[str], files: list[str], tmp_path: Path
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module, "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in files:
        assert (tmp_path / name).is_file() and str(tmp_path / name) in out
