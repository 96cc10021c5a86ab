"""The token-stats ops' two CPU paths as pytest parameters, and the marks of the CUDA-kernel tests."""
import pytest
import torch

from dualrpo_mcore.ops import load_error, load_extension

EXT = load_extension()
HAS_EXT = EXT is not None
_NO_EXT = f"compiled extension not built here: {load_error()}"
BACKENDS = [
    pytest.param("torch", id="fallback"),
    pytest.param("ext", id="kernel", marks=pytest.mark.skipif(not HAS_EXT, reason=_NO_EXT)),
]
_NO_CUDA_BUILD = "dualrpo_mcore._C was built without CUDA (needs a CUDA torch and nvcc)"


def cuda_kernel_marks(needs: str):
    """``pytestmark`` of a file that runs the CUDA kernels: ``needs`` says what the GPU is for."""
    no_device = not torch.cuda.is_available()
    no_build = EXT is None or not EXT.has_cuda()
    return [pytest.mark.gpu, pytest.mark.skipif(no_device, reason=f"no CUDA device: {needs} needs a GPU"),
            pytest.mark.skipif(no_build, reason=_NO_CUDA_BUILD)]
