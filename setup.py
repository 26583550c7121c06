"""Build bsbert's C++/CUDA extension (bsbert._C) with torch.utils.cpp_extension + ninja.

Environment switches (all optional):
  BSBERT_SKIP_CUDA=1         never build the CUDA sources
  BSBERT_FORCE_CUDA=1        build the CUDA sources even if torch cannot see a GPU (default when a
                             toolkit is found and torch is a CUDA build: a GPU is not needed to compile)
  BSBERT_CUDA_ARCH_LIST      e.g. "8.0;8.6;9.0a" (default "8.0;9.0a": sm_80 code also runs on sm_86/89; 9.0a is
                             Hopper with its wgmma kernels, and replaces a plain 9.0), same syntax as TORCH_CUDA_ARCH_LIST;
                             wins over TORCH_CUDA_ARCH_LIST when both are set (used alone, that one is honoured)
  BSBERT_SKIP_EXTENSION=1    pure-Python install (bsbert falls back to its torch paths)
  BSBERT_DEBUG_INFO=1        keep debug info in the C++ objects (Python's own CFLAGS carry -g; bsbert builds with
                             -g0 otherwise: the 2-core CI machine compiled a torch-including file in 61 s instead of 101)
  BSBERT_EMULATE_AVX512=1    tests only: compile the AVX-512 kernels through SIMDe (headers from libsimde-dev, or
                             SIMDE_INCLUDE=<dir holding simde/>) so they run, slowly, on an AVX2+FMA CPU; the
                             extension then reports avx512_bf16 (scripts/test_emulated_avx512.sh uses it)
  MAX_JOBS                   parallel compile jobs (ninja)
  CUDA_HOME                  toolkit location; default: /usr/local/cuda if it holds bin/nvcc
"""
import glob
import os
import sys

from setuptools import find_packages, setup

LICENSE = "Apache-2.0"

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    # The nvcc on PATH may be a wrapper script in /usr/local/bin: torch would then guess CUDA_HOME=/usr/local
    # and fail to link cudart. Prefer an explicit CUDA_HOME, then the conventional toolkit location.
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


cuda_home = _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported

ext_modules, cmdclass = [], {}
if not _env_flag("BSBERT_SKIP_EXTENSION"):
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    build_cuda = (not _env_flag("BSBERT_SKIP_CUDA")) and cuda_home is not None and torch.version.cuda is not None
    if _env_flag("BSBERT_FORCE_CUDA"):
        if cuda_home is None or torch.version.cuda is None:
            sys.exit("BSBERT_FORCE_CUDA=1 but no CUDA toolkit was found or torch is not a CUDA build")
        build_cuda = True
    if build_cuda:
        # torch's cpp_extension reads TORCH_CUDA_ARCH_LIST. bsbert's own variable is the more specific
        # request, so it wins when both are set (a TORCH_CUDA_ARCH_LIST exported for other builds must not
        # silently override it); with neither, bsbert's default. Say which list is used and why.
        if os.environ.get("BSBERT_CUDA_ARCH_LIST"):
            arch_source = "BSBERT_CUDA_ARCH_LIST"
            if os.environ.get("TORCH_CUDA_ARCH_LIST", "") not in ("", os.environ["BSBERT_CUDA_ARCH_LIST"]):
                arch_source += f" (overrides TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r})"
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["BSBERT_CUDA_ARCH_LIST"]
        elif os.environ.get("TORCH_CUDA_ARCH_LIST"):
            arch_source = "TORCH_CUDA_ARCH_LIST"
        else:
            arch_source = "bsbert's default"
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
        print(f"bsbert: CUDA arch list {os.environ['TORCH_CUDA_ARCH_LIST']!r} from {arch_source}", file=sys.stderr)
    has_sm90a = False
    if build_cuda:
        # 9.0a (sm_90a) carries the Hopper wgmma kernels. With both 9.0 and 9.0a in the list the GPU could
        # load the plain sm_90 code, whose wgmma kernels are traps: keep 9.0a only.
        archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";")
        has_sm90a = any(a.startswith("9.0a") for a in archs)
        if has_sm90a:
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(a for a in archs if a and not a.startswith("9.0+")
                                                          and a != "9.0")

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("BSBERT_TORCH_VERSION", f'"{torch.__version__}"')]
    # -fopenmp: at::parallel_for is inline OpenMP code; without it the CPU kernels silently run on one
    # thread. The extension's libgomp.so.1 dependency resolves to the copy torch has already loaded
    # (same SONAME), so there is still a single OpenMP runtime (tests/test_bsr_linear_cpu.py checks).
    cxx_flags = ["-O3", "-std=c++20", "-fno-math-errno", "-fopenmp"]
    if not _env_flag("BSBERT_DEBUG_INFO"):
        cxx_flags.append("-g0")  # after Python's -g, so it wins; objdump/perf still work without it
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _env_flag("BSBERT_EMULATE_AVX512"):
        simde_dirs = [d for d in (os.environ.get("SIMDE_INCLUDE"), "/usr/include", "/usr/local/include")
                      if d and os.path.exists(os.path.join(d, "simde", "x86", "avx512.h"))]
        if not simde_dirs:
            sys.exit("BSBERT_EMULATE_AVX512=1 needs SIMDe's headers: install libsimde-dev (apt) or set "
                     "SIMDE_INCLUDE to the directory that holds simde/x86/avx512.h")
        if simde_dirs[0] not in ("/usr/include", "/usr/local/include"):  # -I of a system dir breaks include_next
            include_dirs.append(simde_dirs[0])
        define_macros.append(("BSBERT_EMULATE_AVX512", None))
        # SIMDe then builds its 512-bit ops from native 256-bit ones; -Wno-psabi: its 64-byte vector arguments
        # draw an ABI note per function (nothing crosses a library boundary)
        cxx_flags += ["-mavx2", "-mfma", "-Wno-psabi"]
        print(f"bsbert: EMULATED AVX-512 build (SIMDe from {simde_dirs[0]}): for tests, not for use",
              file=sys.stderr)
    extra = {"cxx": cxx_flags}
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("BSBERT_WITH_CUDA", None))
        if has_sm90a:
            define_macros.append(("BSBERT_HAS_SM90A", None))
        extra["nvcc"] = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "-Xptxas=-v",
                         "--expt-relaxed-constexpr"]
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    print(f"bsbert: building extension with CUDA={'yes (' + cuda_home + ')' if build_cuda else 'no'}",
          file=sys.stderr)
    ext_modules = [ext_cls("bsbert._C", sources, define_macros=define_macros, extra_compile_args=extra,
                           extra_link_args=["-fopenmp"], include_dirs=include_dirs)]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _license_metadata() -> dict:
    """The license in the form this setuptools reads: an SPDX expression (setuptools >= 77, whose
    `project.license` table form is deprecated and stops being supported after 2027-02-18), else the
    older free-text field. pyproject.toml declares `license` dynamic so that both come from here: the
    build uses whatever setuptools the environment has (--no-build-isolation)."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": LICENSE} if major >= 77 else {"license": LICENSE}


setup(
    packages=find_packages(include=["bsbert", "bsbert.*"]),
    **_license_metadata(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
