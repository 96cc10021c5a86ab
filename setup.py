"""Build script: package metadata lives in pyproject.toml; this file adds what is dynamic.

The fused token-statistics extension under csrc/ is built by `dualrpo_build.py` (CMake driven
from setuptools). Install with `pip install --no-build-isolation .` so the build sees the torch
that is already installed instead of downloading another.
"""
import os
import re
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # PEP 517 backends do not put the project dir on sys.path


def read_version():
    with open(os.path.join(HERE, "dualrpo_mcore", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


# torch is left unpinned on purpose: a user's CUDA build must stay; CI installs the CPU
# 2.13.0 wheel before this package so pip finds the requirement already satisfied.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "numpy>=1.24",
    "sympy>=1.12",
    "math-verify>=0.7",
    "latex2sympy2_extended>=1.0",
    "pillow>=10",
    "tqdm>=4.60",
    "rapidfuzz>=3.0",
    "megatron-core>=0.16.1,<0.20",
    "transformers>=5.0,<6",
    "datasets>=3.0",
    "tokenizers>=0.20",
    "safetensors>=0.4",
    "pyarrow>=15",
    "tensorboard>=2.15",
    "matplotlib>=3.7",
]

EXTRAS = {
    # nemo-run + leptonai (the launch extra) are here so CI runs the launch tests: they install in
    # under a minute and never touch torch (torchx does not depend on it); note torchx pins urllib3<1.27.
    # wandb (the wandb extra) likewise, so CI reads back the offline runs of tests/unit/test_trainer_wandb.py.
    "test": ["pytest>=8", "pytest-timeout>=2.2", "hypothesis>=6.100", "pycocotools>=2.0.7",
             "nemo-run==0.11.1", "leptonai==0.27.3", "wandb>=0.31,<0.32"],
    # 0.5.3-0.5.9 pin transformers 4.57 (we need >=5); 0.5.10 does not hand mm_process_config to the
    # image processor. rollout/sglang_engine.py was read against 0.5.10-0.5.23 (0.5.23 pins torch 2.14.1).
    "sglang": ["sglang>=0.5.11,<0.6"],
    # Per Python because megatron-core is: on 3.11 only 0.16.1 installs, which declares TE >=2.9.0a0,<2.12.0
    # (its METADATA, "dev" extra); 0.17.0-0.19.2 need 3.12 and declare TE with no bound (gating newer
    # features at run time), so there the cap is only the next major. `dualrpo env` flags megatron-core
    # 0.16 with TE >= 2.12 on 3.12. Ranges per version: docs/compatibility.md.
    "te": ['transformer-engine[pytorch]>=2.9,<2.12; python_version < "3.12"',
           'transformer-engine[pytorch]>=2.9,<3; python_version >= "3.12"'],
    "launch": ["nemo-run==0.11.1", "leptonai==0.27.3"],  # nemo-run 0.11.1 imports only with this leptonai
    # W&B beside TensorBoard (logging.wandb); 0.31 is the release its offline run files were read back with.
    "wandb": ["wandb>=0.31,<0.32"],
}


def extension_build():
    """Return (ext_modules, cmdclass) for csrc/ when its build helper is present."""
    try:
        import dualrpo_build  # noqa: F401  (lives beside this file)
    except ImportError:
        return [], {}
    return dualrpo_build.ext_modules(), dualrpo_build.cmdclass()


ext_modules, cmdclass = extension_build()

setup(
    version=read_version(),
    packages=find_packages(include=["dualrpo_mcore", "dualrpo_mcore.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    include_package_data=True,
    zip_safe=False,
)
