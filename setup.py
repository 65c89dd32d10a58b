"""Builds one private pybind11 extension per file in csrc/, inside the package that uses it
(csrc/packing.cpp -> megatron_tokweight.data._packing).

The C++ does indexing only: numpy arrays in, numpy arrays out, bounds checked.
"""
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = Path(__file__).parent
# csrc/<stem>.cpp -> the subpackage whose Python front end calls it
PACKAGE_OF = {"packing": "data", "rows": "data", "counting": "weighting"}
ext_modules = [
    Pybind11Extension(
        f"megatron_tokweight.{PACKAGE_OF[src.stem]}._{src.stem}",
        [str(src.relative_to(HERE))],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
    for src in sorted((HERE / "csrc").glob("*.cpp"))
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
