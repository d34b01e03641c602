"""The build itself: the compiled extension rims_fast._C, its metadata, and the torch-free
kernel tests under CMake/ctest. CI sets RIMS_FAST_REQUIRE_CUDA_BUILD=1, which turns a missing
or CPU-only extension into a failure instead of a skip."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rims_fast import masked_cell as mc

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_CUDA = os.environ.get("RIMS_FAST_REQUIRE_CUDA_BUILD", "") == "1"


def test_extension_loads():
    if not mc.HAVE_C:
        if REQUIRE_CUDA:
            pytest.fail(f"RIMS_FAST_REQUIRE_CUDA_BUILD=1 but rims_fast._C is missing: "
                        f"{mc.C_IMPORT_ERROR}")
        pytest.skip(f"rims_fast._C not built: {mc.C_IMPORT_ERROR}")
    info = mc.BUILD_INFO
    assert set(info) >= {"torch", "cuda", "cuda_arch_list", "nvcc", "compiler"}
    assert info["torch"] == torch.__version__.split("+")[0], "built against another torch"
    from rims_fast import _build_info
    assert _build_info.BUILD == ("cuda" if info["cuda"] else "cpu"), _build_info.REASON
    for name in ("masked_lstm_cell_fwd", "masked_lstm_cell_bwd", "masked_gru_cell_fwd",
                 "masked_gru_cell_bwd"):
        assert hasattr(torch.ops.rims_fast, name)


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not on PATH")
def test_extension_uses_the_shared_cxx_runtime():
    # A _C with its own copy of libstdc++ (linked statically where the toolchain has no
    # libstdc++.so) segfaulted formatting numbers into error messages on the GPU machines; the
    # copy shows as a definition of std::ostream::_M_insert<long>, which _C must import instead.
    if not mc.HAVE_C:
        pytest.skip(f"rims_fast._C not built: {mc.C_IMPORT_ERROR}")
    import rims_fast._C as ext
    # The full table, or the dynamic one where the library is stripped.
    syms = subprocess.run(["nm", ext.__file__], capture_output=True, text=True).stdout
    if not syms.strip():
        syms = subprocess.run(["nm", "-D", ext.__file__], capture_output=True, text=True).stdout
    if not syms.strip():
        pytest.skip("nm lists no symbols of _C")
    insert_long = [line.split() for line in syms.splitlines() if "_ZNSo9_M_insertIlEERSoT_" in line]
    assert insert_long, "_C does not use std::ostream::_M_insert<long> at all (nm output changed?)"
    kinds = {fields[-2] for fields in insert_long}
    assert kinds == {"U"}, f"_C defines the C++ runtime's own symbols ({kinds}): libstdc++ linked in"


@pytest.mark.skipif(not REQUIRE_CUDA, reason="set RIMS_FAST_REQUIRE_CUDA_BUILD=1 to require it")
def test_extension_built_with_cuda():
    assert mc.HAVE_C, mc.C_IMPORT_ERROR
    assert mc.BUILD_INFO["cuda"] is not None, "rims_fast._C was built without CUDA"
    assert mc.BUILD_INFO["cuda_arch_list"], "no GPU architecture compiled in"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rims_fast::masked_lstm_cell_fwd", "CUDA")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on PATH")
def test_kernel_host_tests_ctest(tmp_path):
    """csrc/kernels' __host__ __device__ helpers, tested on the host without torch.
    RIMS_FAST_CMAKE_BUILD_DIR names a CMake build of this tree to reuse (CI builds one before
    pytest); the build step still runs there, so a stale build is brought up to date."""
    build = Path(os.environ.get("RIMS_FAST_CMAKE_BUILD_DIR") or tmp_path / "cmake")
    if not build.is_absolute():
        build = ROOT / build

    def run(*cmd):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"

    run("cmake", "-S", str(ROOT), "-B", str(build))
    run("cmake", "--build", str(build))
    run("ctest", "--test-dir", str(build), "--output-on-failure")
