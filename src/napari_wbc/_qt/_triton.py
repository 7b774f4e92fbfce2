"""Keep triton out of the napari process.

napari draws with OpenGL before any plugin code runs. With Mesa's software
driver (llvmpipe, what Xvfb, VMs and many laptops without a GPU driver use)
that loads Mesa's own LLVM into the process. triton carries another LLVM, and
loading it afterwards crashes the process (a segfault at ``import triton``).
Nothing here needs triton (it only serves ``torch.compile`` on GPUs), yet an
ordinary ``import timm`` pulls it in: timm → torchvision.ops →
torch._dynamo → triton. Whether napari survives must not depend on which of
GL and torch came first, so the widgets refuse the import outright; torch and
torchvision then behave as they do on a machine without triton.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_REASON = (
    "napari-wbc keeps triton out of napari: loaded after the OpenGL driver's LLVM "
    "it crashes the process"
)


class _RefusingLoader(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(f"{spec.name}: {_REASON}", name=spec.name)

    def exec_module(self, module):  # pragma: no cover - create_module raised
        raise ImportError(_REASON, name=module.__name__)


class TritonRefuser(importlib.abc.MetaPathFinder):
    """An import hook that makes ``import triton`` raise ImportError."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "triton" or fullname.startswith("triton."):
            return importlib.machinery.ModuleSpec(fullname, _RefusingLoader())
        return None


def refuse_triton() -> bool:
    """Make ``import triton`` fail from now on, unless it is loaded already.

    Returns True when the hook is in place (or already was).
    """
    if "triton" in sys.modules:
        # Loaded before the GL driver: that order is safe, leave it be.
        return False
    if not any(isinstance(finder, TritonRefuser) for finder in sys.meta_path):
        sys.meta_path.insert(0, TritonRefuser())
    return True
