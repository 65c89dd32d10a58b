"""Builds one private pybind11 extension per file in csrc/ (megatron_tokweight._<stem>).

The C++ does indexing only: numpy arrays in, numpy arrays out, bounds checked.
"""
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = Path(__file__).parent
ext_modules = [
    Pybind11Extension(
        f"megatron_tokweight._{src.stem}",
        [str(src.relative_to(HERE))],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
    for src in sorted((HERE / "csrc").glob("*.cpp"))
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
