#!/usr/bin/env python3
"""Compiles the engine's CUDA kernel sources with NVRTC, exactly as the CUDA build does at
run time (cudarc's `compile_ptx`: no options, no include path), on a machine without a GPU.

NVRTC needs no driver, so a syntax or type error in a kernel shows here, before device time
is spent. It cannot check what the kernel computes: that is tests/gpu_parity.py's job on a
GPU.

    eval "$(bash ../shared/gpu/cuda-build-env.sh)"     # NVRTC 13 from PyPI wheels
    python3 tests/nvrtc_check.py                       # every kernel in src/

The sources are the `const SRC: &str = r#"…"#;` blocks of the Rust files under src/, each
after `cuda_kernels.rs`'s PRELUDE (what `cuda_kernels::ptx` compiles). NVRTC loads
libnvrtc-builtins from LD_LIBRARY_PATH: put $CUDA_ROOT/lib there. The
library is found in $CUDA_ROOT/lib, then in Python's nvidia/cu13/lib (the GPU machine's
PyTorch venv), or given with --nvrtc.
"""
import argparse
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def find_nvrtc(given):
    candidates = [given] if given else []
    if os.environ.get("CUDA_ROOT"):
        candidates.append(os.path.join(os.environ["CUDA_ROOT"], "lib", "libnvrtc.so.13"))
    try:
        import nvidia  # type: ignore

        for base in nvidia.__path__:
            candidates += glob.glob(os.path.join(base, "cu13", "lib", "libnvrtc.so.13"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.exists(c):
            return c
    sys.exit("nvrtc_check: libnvrtc.so.13 not found (set CUDA_ROOT or pass --nvrtc)")


def prelude():
    """What the engine prepends to every kernel (`cuda_kernels.rs`: `PRELUDE`)."""
    path = os.path.join(ROOT, "src", "engine", "models", "cuda_kernels.rs")
    m = re.search(r'const PRELUDE: &str = r#"(.*?)"#;', open(path, encoding="utf-8").read(), re.S)
    if not m:
        sys.exit(f"nvrtc_check: no PRELUDE in {path}")
    return m.group(1)


def sources():
    """(file, kernel source) for every `const SRC: &str = r#"…"#;` under src/, with the
    prelude in front as the engine compiles it."""
    head = prelude()
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "src", "**", "*.rs"), recursive=True)):
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r'const SRC: &str = r#"(.*?)"#;', text, re.S):
            found.append((os.path.relpath(path, ROOT), head + m.group(1)))
    return found


def compile_one(lib, name, src, opts):
    prog = ctypes.c_void_p()
    check = lambda r, what: r == 0 or sys.exit(f"nvrtc_check: {what} failed ({r})")
    check(
        lib.nvrtcCreateProgram(
            ctypes.byref(prog), src.encode(), name.encode(), 0, None, None
        ),
        "nvrtcCreateProgram",
    )
    argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), argv)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = b""
    if rc == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace"), ptx.decode(errors="replace")


def assemble(ptx, arch, sm):
    """ptxas on the PTX: whether it assembles for `sm`, and each kernel's registers and
    spills (as the driver's JIT would see them). Returns 1 on failure."""
    if arch.replace("compute_", "sm_") != sm:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        open(src, "w").write(ptx)
        r = subprocess.run(
            ["ptxas", f"-arch={sm}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    if r.returncode != 0:
        print(f"FAIL ptxas {sm}\n{r.stderr}")
        return 1
    stats, name = {}, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            stats[name] = {}
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            stats[name]["spills"] = f"{m.group(1)}/{m.group(2)}"
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            stats[name]["registers"] = m.group(1)
    for name in sorted(stats):
        st = stats[name]
        print(f"       {sm} {name}: {st.get('registers', '?')} registers, "
              f"spill stores/loads {st.get('spills', '?')} bytes")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nvrtc", help="path to libnvrtc.so")
    ap.add_argument(
        "--arch",
        action="append",
        default=None,
        help="also compile for this virtual architecture (default: NVRTC's own, and compute_90)",
    )
    ap.add_argument(
        "--ptxas",
        default="sm_90",
        help="assemble the compute_90 PTX with ptxas for this GPU (registers, spills) when "
        "ptxas is on PATH; 'none' to skip (default sm_90)",
    )
    args = ap.parse_args()
    lib = ctypes.CDLL(find_nvrtc(args.nvrtc))
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    print(f"NVRTC {major.value}.{minor.value}")
    archs = args.arch or ["compute_90"]
    failed = 0
    srcs = sources()
    if not srcs:
        sys.exit("nvrtc_check: no kernel sources found under src/")
    for path, src in srcs:
        # As the engine compiles it (no options), then for each architecture asked for.
        for opts in [[]] + [[f"--gpu-architecture={a}"] for a in archs]:
            began = time.monotonic()
            rc, log, ptx = compile_one(lib, os.path.basename(path) + ".cu", src, opts)
            took = time.monotonic() - began
            kernels = re.findall(r"\.entry\s+(\w+)", ptx)
            what = " ".join(opts) or "(no options)"
            if rc != 0:
                failed += 1
                print(f"FAIL {path} {what}\n{log}")
            else:
                print(f"ok   {path} {what} ({took:.1f} s): {len(kernels)} kernels: {' '.join(kernels)}")
                if log.strip():
                    print(log)
                if opts and args.ptxas != "none" and shutil.which("ptxas"):
                    failed += assemble(ptx, opts[0].split("=")[1], args.ptxas)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
