"""Build script: pure-Python package + Triton kernels, and the optional CUDA extension prefkern._C.

Environment:
  PREFKERN_BUILD_CUDA   auto (default): build prefkern._C when nvcc is found, warn on failure;
                        1: the build is mandatory (missing nvcc or a failed build is an error);
                        0: never build it.
  PREFKERN_CUDA_ARCHS   CMake CUDA architectures, default "80;90".
  CUDACXX / CUDA_HOME   where to look for nvcc (else PATH).

setup.py never imports torch: the extension takes raw pointers, sizes and a stream from Python,
so it does not depend on the torch C++ ABI and compiles where torch has no CUDA.
"""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _build_mode() -> str:
    mode = os.environ.get("PREFKERN_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"PREFKERN_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with ninja, putting the module where setuptools
    expects it (in place for editable installs). An optional build that is skipped or fails is
    dropped from the extension list, so nothing later looks for its file."""

    def build_extensions(self) -> None:
        self._not_built: set[str] = set()
        super().build_extensions()
        self.extensions = [e for e in self.extensions if e.name not in self._not_built]

    def build_extension(self, ext: Extension) -> None:
        mandatory = _build_mode() == "1"
        nvcc = _find_nvcc()
        if nvcc is None:
            msg = ("nvcc not found: prefkern._C (CUDA backend) is not built; "
                   "Triton/torch backends only")
            if mandatory:
                raise RuntimeError(msg + " (PREFKERN_BUILD_CUDA=1)")
            warnings.warn(msg, stacklevel=1)
            self._not_built.add(ext.name)
            return
        try:
            self._cmake_build(ext, nvcc)
        except Exception as err:  # optional build: never fail the install
            if mandatory:
                raise
            warnings.warn(f"building prefkern._C failed, CUDA backend unavailable: {err}",
                          stacklevel=1)
            self._not_built.add(ext.name)

    def _cmake_build(self, ext: Extension, nvcc: str) -> None:
        import pybind11

        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("PREFKERN_CUDA_ARCHS", "80;90")
        configure = [
            _cmake_exe(), "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPREFKERN_OUTPUT_DIR={out_file.parent}",
        ]
        ninja = _ninja_exe()
        if ninja:
            configure.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        subprocess.run(configure, check=True)
        subprocess.run([_cmake_exe(), "--build", str(build_dir), "-j", str(os.cpu_count() or 2)],
                       check=True)
        if not out_file.exists():
            raise RuntimeError(f"CMake finished but {out_file} was not produced")


def _cmake_exe() -> str:
    try:
        import cmake  # the PyPI wrapper ships a binary

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return shutil.which("cmake") or "cmake"


def _ninja_exe() -> str | None:
    try:
        import ninja

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        return shutil.which("ninja")


ext_modules = [] if _build_mode() == "0" else [CMakeExtension("prefkern._C")]

setup(
    packages=find_packages(include=["prefkern", "prefkern.*"]) + ["prefkern._kernels"],
    package_dir={"prefkern._kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
