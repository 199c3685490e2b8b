"""Makes torchvision's Python parts importable on CPU boxes where its compiled ops cannot load.

The package registry's torchvision is a CUDA build. Beside a CPU torch its `_C` library fails to
load, and then `import torchvision` dies registering fake kernels for `torchvision::nms`, an operator
that was never declared. transformers imports torchvision whenever it is installed, so the Qwen2-VL
image and video processors that vLLM uses die with it, in every process that imports vLLM's model
code (vLLM inspects models in subprocesses of its own).

The fix: declare the two operator schemas torchvision's import registers against (`nms`, `qnms`)
before its first import, and only where its library does not load. No kernel is provided: calling
those ops still fails, and nothing in this project calls them. `install()` writes a `.pth` file into
the environment (`make setup-vllm` runs it) so that every interpreter there arms a one-shot import
hook; the hook does nothing until something imports torchvision, and nothing at all where a matching
torch and torchvision are installed (GPU machines with the official builds).

    python -m ume_r1.torchvision_guard install      # what the install step runs
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "ume_r1_torchvision_guard.pth"
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # the torch.library.Library that holds the declared schemas; kept alive here


def compiled_ops_load() -> bool:
    """Whether torchvision's compiled library loads beside this torch (True if it is not installed)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True
    libraries = sorted(Path(spec.origin).parent.glob("_C*.so"))
    if not libraries:
        return False
    try:
        torch.ops.load_library(str(libraries[0]))
    except OSError:
        return False
    return True


def declare_missing_ops() -> bool:
    """Declare the schemas when the compiled ops cannot load; returns whether it had to."""
    global _library
    if _library is not None or compiled_ops_load():
        return False
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        _library.define(schema)
    return True


class _FirstImportHook(importlib.abc.MetaPathFinder):
    """Runs `declare_missing_ops` just before the first `import torchvision`, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            declare_missing_ops()
        return None  # the ordinary finders import the package


def arm() -> None:
    """Called by the `.pth` line at interpreter start; cheap: imports nothing."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _FirstImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _FirstImportHook())


def install(site_packages: str | None = None) -> Path:
    """Write the `.pth` file into this environment's site-packages."""
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text("import ume_r1.torchvision_guard as g; g.arm()\n")
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        raise SystemExit("usage: python -m ume_r1.torchvision_guard install")
    print(f"wrote {install()}")
