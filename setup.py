"""fastflow: fast, correct training and sampling for image diffusion and flow models.

Install (torch must already be installed; the C++ extension builds against it):
    pip install torch==2.14.1 torchvision==0.29.1
    pip install --no-build-isolation -e ".[dev]"

Set FASTFLOW_NO_EXT=1 to skip the C++ CPU extension (the ops then fall back to the reference).
"""

import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if cpp_sources and os.environ.get("FASTFLOW_NO_EXT", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            name="fastflow._C",
            sources=cpp_sources,
            # Baseline x86-64-v2; the hot kernels also carry an x86-64-v3 (AVX2+FMA) clone chosen
            # at load time (csrc/simd.h, target_clones). -ffp-contract=fast lets a*b+c become an
            # FMA in that clone (ISO -std=c++20 turns contraction off). torch 2.14 headers need C++20.
            extra_compile_args={
                "cxx": ["-O3", "-fopenmp", "-march=x86-64-v2", "-std=c++20", "-ffp-contract=fast", "-Wno-psabi"]
            },
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=False)

setup(
    name="fastflow",
    version="0.1.0",
    description="Fast, correct training and sampling for DDPM, DDIM, Flow Matching and Flow Map Matching",
    python_requires=">=3.10",
    packages=find_packages(include=["fastflow", "fastflow.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "einops",
        "pyyaml",
        "tensorboard",
        "numpy",
        "pillow",
        "scikit-learn",  # ships the built-in digits dataset (no download)
        "tqdm",
    ],
    extras_require={
        # DALI's CPU decoder is tested against the PIL path (x86_64 wheels on PyPI, ~200 MB)
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "nvidia-dali-cuda130; platform_machine == 'x86_64'"],
        "hub": ["datasets"],
        "dali": ["nvidia-dali-cuda130"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
