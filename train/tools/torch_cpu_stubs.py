#!/usr/bin/env python3
"""Makes PyPI's CUDA build of torch import and run on a CPU-only machine without the
multi-GB nvidia-* wheels it asks for.

PyPI's Linux x86_64 torch wheel links libcudart, libcublas, libcudnn, ... (DT_NEEDED of
libtorch_cpu.so, libtorch_cuda.so, ...). Installed with --no-deps, `import torch` fails on
the first missing library. This script writes tiny stand-in libraries with the same sonames
and symbol versions, every function a stub that reports "no CUDA device" (cudaErrorNoDevice
= 100); the CUDA runtime's fat-binary registration (run by static initializers at load time)
is a no-op. Nothing CPU-side calls them, so torch works on CPU and
torch.cuda.is_available() is False.

Usage: torch_cpu_stubs.py SITE_DIR   (the --target directory torch was installed into)
The stubs go to SITE_DIR/nvidia/cu13/lib, which is on torch's RPATH.
"""
import os
import re
import subprocess
import sys
import tempfile

site = os.path.abspath(sys.argv[1])
torch_lib = os.path.join(site, "torch", "lib")
out_dir = os.path.join(site, "nvidia", "cu13", "lib")
os.makedirs(out_dir, exist_ok=True)

libs = [os.path.join(torch_lib, f) for f in os.listdir(torch_lib) if ".so" in f]
libs += [os.path.join(site, "torch", f) for f in os.listdir(os.path.join(site, "torch")) if f.endswith(".so")]


def run(*args):
    return subprocess.run(args, capture_output=True, text=True).stdout


# Which missing sonames each torch library needs.
needed = set()
for lib in libs:
    for m in re.finditer(r"\(NEEDED\).*\[(.+?)\]", run("readelf", "-d", lib)):
        name = m.group(1)
        if name.startswith(("libcu", "libnv", "libnccl")):
            needed.add(name)

# Versioned undefined symbols say which library they come from: the version-needs section
# (readelf -V) maps each version name (often the soname, NVSHMEM for nvshmem) to its file.
by_lib = {name: set() for name in needed}
version_of = {name: {} for name in needed}  # soname -> {version name: symbols}
version_file = {}
for lib in libs:
    current = None
    for line in run("readelf", "-V", lib).splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Name: (\S+)", line)
        if m and current in needed:
            version_file[m.group(1)] = current
for lib in libs:
    for line in run("nm", "-D", "--undefined-only", lib).splitlines():
        sym = line.split()[-1]
        if "@" in sym:
            base, version = sym.split("@", 1)
            version = version.lstrip("@")
            soname = version_file.get(version)
            if soname:
                by_lib[soname].add(base)
                version_of[soname].setdefault(version, set()).add(base)

SPECIAL = r"""
static void *stub_handle[4];
void **__cudaRegisterFatBinary(void *fat) { (void)fat; return stub_handle; }
void __cudaRegisterFatBinaryEnd(void **h) { (void)h; }
void __cudaUnregisterFatBinary(void **h) { (void)h; }
void __cudaRegisterFunction(void) {}
void __cudaRegisterVar(void) {}
void __cudaRegisterManagedVar(void) {}
void __cudaRegisterSurface(void) {}
void __cudaRegisterTexture(void) {}
int cudaGetDeviceCount(int *count) { if (count) *count = 0; return 100; }
const char *cudaGetErrorString(int e) { (void)e; return "no CUDA device (CPU-only stub library)"; }
const char *cudaGetErrorName(int e) { (void)e; return "cudaErrorNoDevice"; }
int cudaRuntimeGetVersion(int *v) { if (v) *v = 13000; return 0; }
int cudaDriverGetVersion(int *v) { if (v) *v = 0; return 0; }
"""
special_names = set(re.findall(r"\b(\w+)\(", SPECIAL)) - {"void", "int", "char"}


def build(soname, symbols, extra_unversioned=()):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "stub.c")
        with open(src, "w") as f:
            if soname.startswith("libcudart"):
                f.write(SPECIAL)
            for sym in sorted(set(symbols) | set(extra_unversioned)):
                if sym in special_names and soname.startswith("libcudart"):
                    continue
                f.write(f"int {sym}(void) {{ return 100; }}\n")
        args = ["gcc", "-shared", "-fPIC", "-O1", "-o", os.path.join(out_dir, soname),
                f"-Wl,-soname,{soname}", src]
        if symbols:
            vs = os.path.join(tmp, "version.map")
            with open(vs, "w") as f:
                # One node per version name torch binds against; unversioned extras go
                # into the first node too, which satisfies unversioned references.
                for i, (version, names) in enumerate(sorted(version_of[soname].items())):
                    names = set(names) | (set(extra_unversioned) if i == 0 else set())
                    f.write(f"{version} {{ global: {'; '.join(sorted(names))}; }};\n")
            args.insert(-1, f"-Wl,--version-script={vs}")
        subprocess.run(args, check=True)


# First pass: versioned symbols only; then ask the loader what is still undefined.
for soname, symbols in by_lib.items():
    build(soname, symbols)


def still_undefined():
    missing = set()
    env = dict(os.environ, LD_LIBRARY_PATH=out_dir + ":" + torch_lib)
    for lib in libs:
        text = subprocess.run(["ldd", "-r", lib], capture_output=True, text=True, env=env)
        for m in re.finditer(r"undefined symbol: (\S+?)(?:,|\s|\t|$)", text.stdout + text.stderr):
            sym = m.group(1)
            # The interpreter provides the Python C API to libtorch_python.so.
            if "@" not in sym and not re.match(r"_?Py|_Py", sym):
                missing.add(sym)
    return missing


# Symbols torch's own libraries define resolve at run time through the global scope.
defined = set()
for lib in libs:
    for line in run("nm", "-D", "--defined-only", lib).splitlines():
        defined.add(line.split()[-1].split("@")[0])
# The driver API (cuInit, cuLaunchKernel, ... of libcuda.so.1) is opened with dlopen only when
# a GPU is used, as on any machine without a GPU driver: leave it out.
DRIVER = re.compile(r"^cu(?!File)[A-Z]")
missing = {s for s in still_undefined() - defined if not DRIVER.match(s)}
# Unversioned references: give each to the library its prefix names; any library in the
# lookup scope satisfies an unversioned reference, so the guess only has to be one of them.
PREFIXES = [("cusparseLt", "libcusparseLt"), ("cuFile", "libcufile"), ("nccl", "libnccl"),
            ("nvshmem", "libnvshmem"), ("cudnn", "libcudnn"), ("cublasLt", "libcublasLt"),
            ("cublas", "libcublas"), ("cusparse", "libcusparse"), ("cusolver", "libcusolver"),
            ("cufft", "libcufft"), ("nvrtc", "libnvrtc"), ("cupti", "libcupti"), ("cu", "libcudart")]
extra = {name: set() for name in needed}
for sym in missing:
    owner = next((s for p, prefix in PREFIXES if sym.startswith(p)
                  for s in sorted(needed) if s.startswith(prefix + ".so")), None)
    owner = owner or sorted(needed)[0]
    extra[owner].add(sym)
for soname, syms in extra.items():
    if syms:
        build(soname, by_lib[soname], extra_unversioned=syms)
left = {s for s in still_undefined() - defined if not DRIVER.match(s)}
print(f"stubbed {len(needed)} libraries in {out_dir} "
      f"({sum(len(s) for s in by_lib.values())} versioned + {len(missing)} unversioned symbols); "
      f"unresolved after: {len(left)}")
if left:
    print(" ".join(sorted(left)[:20]))
    sys.exit(1)
