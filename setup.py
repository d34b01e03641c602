"""Build of rims_fast: one extension, rims_fast._C (CUDA + CPU ops, or CPU ops alone).

Paths, chosen in this order (one line printed says which and why):
  RIMS_FAST_SKIP_BUILD=1        pure Python, no extension
  RIMS_FAST_SKIP_CUDA_BUILD=1   C++ CPU ops only (CppExtension over csrc/*.cpp)
  CUDA torch + nvcc found       CUDA + CPU ops (CUDAExtension over csrc/*.cpp, csrc/*.cu)
  otherwise                     C++ CPU ops only
nvcc is looked up under CUDA_HOME (default /usr/local/cuda). TORCH_CUDA_ARCH_LIST defaults to
"8.0;9.0a". Build with `pip install --no-build-isolation [-e] .` so the extension is compiled
against the torch you run; MAX_JOBS limits ninja's parallel jobs.
RIMS_FAST_SEQ_TILE_MAX (1..8, default 8): the largest tile the persistent kernels are compiled
for (their per-sample code is unrolled that many times); a diagnostic for GPU runs that compare
kernel sizes, not an install option (the tests use tiles up to 3 and 8).
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_ARCH_LIST = "8.0;9.0a"  # Ampere and Hopper (sm_90a unlocks wgmma/TMA); nvcc 13 >= 7.5


def _flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _choose_build():
    """Return (path, reason, torch module or None)."""
    if _flag("RIMS_FAST_SKIP_BUILD"):
        return "python", "RIMS_FAST_SKIP_BUILD is set", None
    try:
        import torch
    except ImportError:
        return "python", "torch is not importable here (build with --no-build-isolation)", None
    if _flag("RIMS_FAST_SKIP_CUDA_BUILD"):
        return "cpu", "RIMS_FAST_SKIP_CUDA_BUILD is set", torch
    if torch.version.cuda is None:
        return "cpu", f"torch {torch.__version__} is a CPU-only build", torch
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = Path(cuda_home, "bin", "nvcc")
    if not nvcc.is_file():
        return "cpu", f"no nvcc at {nvcc} (set CUDA_HOME)", torch
    # torch.utils.cpp_extension reads CUDA_HOME when imported: pin it to the nvcc we found.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    return "cuda", f"torch {torch.__version__} has CUDA {torch.version.cuda}, nvcc at {nvcc}", torch


def _seq_tile_max():
    v = os.environ.get("RIMS_FAST_SEQ_TILE_MAX", "8").strip()
    if not v.isdigit() or not 1 <= int(v) <= 8:
        raise SystemExit(f"RIMS_FAST_SEQ_TILE_MAX must be an integer in 1..8, got {v!r}")
    return int(v)


def _build_info_text(path, reason, torch):
    cuda = path == "cuda"
    info = {
        "BUILD": path,
        "REASON": reason,
        "TORCH_VERSION": torch.__version__ if torch is not None else None,
        "CUDA_VERSION": torch.version.cuda if cuda else None,
        "CUDA_ARCH_LIST": os.environ["TORCH_CUDA_ARCH_LIST"] if cuda else None,
        "SEQ_TILE_MAX": _seq_tile_max() if path != "python" else None,
    }
    lines = ['"""Written by setup.py at build time; do not edit."""', ""]
    return "\n".join(lines + [f"{k} = {v!r}" for k, v in info.items()]) + "\n"


def _link_args():
    # The C++ runtime by its shared object's name. Built on the GPU machines' image, _C held its
    # own copy of libstdc++ code (presumably linked from libstdc++.a: where g++ finds no
    # libstdc++.so it falls back to the archive), so the process ran two C++ runtimes, and
    # formatting a number into a torch error message (TORCH_CHECK's c10::str) segfaulted in the
    # private copy instead of raising. Naming libstdc++.so.6 first resolves every C++ runtime
    # symbol from the shared library whatever the toolchain's defaults, -static-libstdc++
    # included (tests/test_build.py checks the result). By the compiler's own path to it
    # (-print-file-name), since `-l:libstdc++.so.6` fails where that file is outside the linker's
    # search path (a conda toolchain without its LDFLAGS); no flag if the compiler finds none.
    if not sys.platform.startswith("linux"):
        return []
    import subprocess
    try:
        found = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libstdc++.so.6"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    return [os.path.normpath(found)] if os.path.isabs(found) else []


def _extensions(path, reason, torch):
    if path == "python":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # Paths relative to setup.py: setuptools rejects absolute source paths in some modes.
    cpp = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    if not cpp:  # e.g. an sdist made without MANIFEST.in: fail here, not with an empty _C
        raise SystemExit(f"rims_fast: no C++ sources in {ROOT / 'csrc'}; build from a full "
                         "checkout or sdist, or set RIMS_FAST_SKIP_BUILD=1 for the Python backends")
    # No --use_fast_math / -ffast-math: the ops promise nn.LSTMCell/GRUCell numerics. No -std:
    # torch adds the -std its own headers need (C++20 for torch 2.14).
    # -g0: Python's CFLAGS bring -g, which made the host files' template-heavy compiles ~1.6x
    # slower (and the .so several times larger). RIMS_FAST_CXX_FLAGS comes last, so it can take
    # it back ("-g") or change the level (tools/asan_host_tests.sh: "-O1 -g", ASan's advice).
    cxx = ["-O3", "-g0"] + os.environ.get("RIMS_FAST_CXX_FLAGS", "").split()
    tile_max = [("RIMS_SEQ_TILE_MAX", str(_seq_tile_max()))]
    kwargs = dict(name="rims_fast._C", include_dirs=[str(ROOT / "csrc")],
                  extra_link_args=_link_args())
    if path == "cuda":
        ext = CUDAExtension(
            sources=cpp + cu,
            define_macros=[("RIMS_FAST_WITH_CUDA", "1")] + tile_max,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            **kwargs,
        )
    else:
        ext = CppExtension(sources=cpp, define_macros=tile_max, extra_compile_args={"cxx": cxx},
                           **kwargs)

    class build_ext(BuildExtension.with_options(use_ninja=True)):
        # The metadata is written by the command that builds _C, so it always describes the _C
        # beside it (not whatever setup.py invocation ran last, e.g. a metadata-only one).
        def run(self):
            super().run()
            # Beside _C: in the source tree for --inplace and editable builds, else in build_lib
            # (build_py ran before build_ext, so this overwrites any stale copy from the tree).
            pkg = ROOT / "rims_fast" if self.inplace else Path(self.build_lib, "rims_fast")
            pkg.mkdir(parents=True, exist_ok=True)
            (pkg / "_build_info.py").write_text(_build_info_text(path, reason, torch))

    return [ext], {"build_ext": build_ext}


def _packages():
    packages = find_packages(include=["rims_fast", "rims_fast.*"])
    # triton_kernels ships inside the package: a top-level `triton_kernels` would collide with
    # Triton's own package of that name.
    # The benchmark suite too (the rims-bench script): installed as a top-level `benchmarks` it
    # would take that common name in site-packages, and a project's own benchmarks/ folder in the
    # working directory would shadow it. `python -m benchmarks` in a checkout is unchanged.
    package_dir = {"rims_fast.triton_kernels": "triton_kernels"}
    packages.append("rims_fast.triton_kernels")
    if (ROOT / "benchmarks" / "__init__.py").is_file():
        package_dir["rims_fast.benchmarks"] = "benchmarks"
        packages.append("rims_fast.benchmarks")
    return packages, package_dir


build_path, build_reason, _torch = _choose_build()
print(f"rims_fast: building {build_path!r} ({build_reason})", flush=True)
if build_path == "python":  # no build_ext runs to write it
    (ROOT / "rims_fast" / "_build_info.py").write_text(_build_info_text(build_path, build_reason, None))
ext_modules, cmdclass = _extensions(build_path, build_reason, _torch)
packages, package_dir = _packages()

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
