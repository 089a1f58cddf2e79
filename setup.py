"""Build fastdume._C (C++17, always) and fastdume._C_cuda (when nvcc is found).

Both are compiled by one generated ninja file so that the objects build in parallel
(MAX_JOBS caps the parallelism). Torch is not needed at build time: the extensions
exchange raw pointers and stream handles with Python.

Environment:
  FASTDUME_CUDA=0          skip the CUDA module even when nvcc is present
  FASTDUME_CUDA_ARCHS      e.g. "80;90a" (default), real architectures to embed
  MAX_JOBS                 parallel compile jobs for ninja
"""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pybind11
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _nvcc():
    if os.environ.get("FASTDUME_CUDA", "1") == "0":
        return None
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        found = str(candidate) if candidate.exists() else None
    return found


def _sources(ext_name):
    # setuptools wants paths relative to setup.py; ninja gets absolute ones later.
    if ext_name == "fastdume._C":
        found = (ROOT / "csrc").glob("*.cpp")
    else:
        found = [*(ROOT / "csrc" / "cuda").glob("*.cpp"), *(ROOT / "csrc" / "cuda").glob("*.cu")]
    return sorted(str(p.relative_to(ROOT)) for p in found)


class NinjaBuildExt(build_ext):
    """Compile every extension through a single ninja graph."""

    def build_extensions(self):
        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], str(ROOT / "csrc")]
        inc = " ".join(f"-I{i}" for i in includes)
        cxx = os.environ.get("CXX", "c++")
        lines = [
            f"cxxflags = -O3 -std=c++17 -fPIC -fvisibility=hidden -fopenmp -Wall {inc}",
            f"nvccflags = -O3 -std=c++17 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden "
            f"-Xcompiler -fopenmp {self._gencode()} {inc}",
            f"rule cxx\n  command = {cxx} $cxxflags -MMD -MF $out.d -c $in -o $out\n"
            "  depfile = $out.d\n  deps = gcc",
            f"rule nvcc\n  command = {_nvcc() or 'nvcc'} $nvccflags -c $in -o $out",
            f"rule link\n  command = {cxx} -shared $in -o $out -fopenmp $ldflags",
            f"rule nvlink\n  command = {_nvcc() or 'nvcc'} -shared -cudart static $in -o $out "
            "-Xcompiler -fopenmp $ldflags",
        ]
        for ext in self.extensions:
            objects = []
            for src in ext.sources:
                rel = Path(src)
                obj = build_dir / rel.with_suffix(rel.suffix + ".o")
                rule = "nvcc" if src.endswith(".cu") else "cxx"
                if ext.name == "fastdume._C_cuda" and rule == "cxx":
                    # host files of the CUDA module may include cuda_runtime.h
                    rule = "nvcc"
                lines.append(f"build {obj}: {rule} {ROOT / src}")
                objects.append(str(obj))
            out = Path(self.get_ext_fullpath(ext.name)).resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            link = "nvlink" if ext.name == "fastdume._C_cuda" else "link"
            lines.append(f"build {out}: {link} {' '.join(objects)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call(["ninja", "-C", str(build_dir), "-j", jobs])

    def _gencode(self):
        archs = os.environ.get("FASTDUME_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
        return " ".join(
            f"-gencode arch=compute_{a},code=sm_{a}" for a in (s.strip() for s in archs) if a
        )


extensions = [Extension("fastdume._C", _sources("fastdume._C"))]
if _nvcc() is not None:
    extensions.append(Extension("fastdume._C_cuda", _sources("fastdume._C_cuda")))

setup(
    packages=find_packages(include=["fastdume", "fastdume.*"]) + ["fastdume.kernels"],
    package_dir={"fastdume": "fastdume", "fastdume.kernels": "kernels"},
    ext_modules=extensions,
    cmdclass={"build_ext": NinjaBuildExt},
)
