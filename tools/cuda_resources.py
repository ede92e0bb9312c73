"""Resource report and check of the CUDA kernels, from ptxas's ``-v`` output.

Reads the output of ``.ci/compile_cuda.sh`` (nvcc -Xptxas -v of every ``csrc/**/*.cu`` for sm_80
and sm_90, and of the CUDA build's host-only ``csrc/ops/cuda/*.cpp``, which report no kernel: one
block per file, headed ``nvcc -c FILE: exit N``) and, for every kernel and template
instance, reports registers per thread, spill stores, stack frame (local memory) and static shared
memory.  It checks each kernel against the header comment of its file:

- no spill stores and no stack frame, unless the header has a line ``Local memory: at most N bytes
  per thread, <why>``, and then at most N bytes of each;
- registers per thread at most the ``at most R registers per thread`` that the header's
  ``Occupancy:`` line claims (the occupancy follows from it: an SM has 65,536 registers).

Usage::

    bash .ci/compile_cuda.sh > nvcc.log
    python tools/cuda_resources.py nvcc.log --check                     # exit 1 on a violation
    python tools/cuda_resources.py nvcc.log --write bench/results/cuda-resources.md
    python tools/cuda_resources.py nvcc.log --compare bench/results/cuda-resources.md
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER_LINES = 60  # the header comment of a kernel file lies within its first lines
FILE_START = re.compile(r"^nvcc -c (\S+): exit (\d+)$")
ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")
CLAIM = re.compile(r"Occupancy:.*?at most (\d+) registers per thread", re.S)
LOCAL_MEMORY = re.compile(r"^//\s*Local memory: at most (\d+) bytes per thread, \S", re.M)


@dataclass
class Kernel:
    file: str
    mangled: str
    arch: int
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    shared: int = 0
    name: str = ""


def parse(log: str) -> list[Kernel]:
    """The kernels of an nvcc -Xptxas -v log of .ci/compile_cuda.sh, in log order."""
    kernels: list[Kernel] = []
    current_file = None
    for line in log.splitlines():
        if match := FILE_START.match(line):
            current_file = match.group(1)
        elif match := ENTRY.search(line):
            kernels.append(Kernel(current_file, match.group(1), int(match.group(2))))
        elif kernels and (match := FRAME.search(line)):
            kernels[-1].stack, kernels[-1].spill_stores = int(match.group(1)), int(match.group(2))
        elif kernels and (match := USED.search(line)):
            kernels[-1].registers = int(match.group(1))
            smem = SMEM.search(line)
            kernels[-1].shared = int(smem.group(1)) if smem else 0
    names = demangle([k.mangled for k in kernels])
    for kernel, name in zip(kernels, names):
        kernel.name = name
    return kernels


def demangle(symbols: list[str]) -> list[str]:
    """Readable kernel names: c++filt, without the namespaces, argument lists and ``at::``."""
    if not symbols:
        return []
    out = subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    names = []
    for name in out:
        name = re.sub(r"keypointops::\(anonymous namespace\)::|c10::|at::", "", name)
        name = re.sub(r"^void ", "", name)
        name = re.sub(r"\(.*\)$", "", name)  # the argument list
        names.append(name)
    return names


def header(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return "".join(f.readlines()[:HEADER_LINES])


def check(kernels: list[Kernel]) -> list[str]:
    """The violations of the header claims, one line each."""
    problems = []
    headers = {k.file: header(k.file) for k in kernels}
    for kernel in kernels:
        text = headers[kernel.file]
        where = f"{kernel.file}: {kernel.name} (sm_{kernel.arch})"
        local = LOCAL_MEMORY.search(text)
        allowed = int(local.group(1)) if local else 0
        if max(kernel.spill_stores, kernel.stack) > allowed:
            problems.append(f"{where}: {kernel.spill_stores} bytes of spill stores and {kernel.stack} bytes "
                            f"of stack frame, more than the header's 'Local memory: at most {allowed} bytes per "
                            f"thread, <why>' allows")
        claim = CLAIM.search(text)
        if claim is None:
            problems.append(f"{kernel.file}: the header claims no occupancy ('Occupancy: ... at most R "
                            f"registers per thread')")
        elif kernel.registers > int(claim.group(1)):
            problems.append(f"{where}: {kernel.registers} registers per thread, more than the "
                            f"{claim.group(1)} the header's occupancy claim allows")
    return list(dict.fromkeys(problems))


def table(kernels: list[Kernel], nvcc: str) -> str:
    """The markdown report: a preamble (how it is made, by which nvcc) and one row per kernel."""
    lines = ["# CUDA kernels: registers, local memory and shared memory per template instance", "",
             "`bash .ci/compile_cuda.sh > nvcc.log && python tools/cuda_resources.py nvcc.log --write FILE`: "
             "ptxas -v of every kernel", f"for sm_80 and sm_90 with setup.py's flags ({nvcc}). Registers per "
             "thread; spill stores and stack frame", "in bytes per thread; static shared memory in bytes per "
             "block. CI checks each row against its file's header", "comment and that this table is current.", "",
             "| file | kernel (template instance) | sm | registers | spill stores (B) | "
             "stack frame (B) | static shared (B) |", "|---|---|---|---|---|---|---|"]
    for k in sorted(kernels, key=lambda k: (k.file, k.name, k.arch)):
        lines.append(f"| {os.path.basename(k.file)} | `{k.name}` | {k.arch} | {k.registers} | "
                     f"{k.spill_stores} | {k.stack} | {k.shared} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="output of .ci/compile_cuda.sh")
    parser.add_argument("--check", action="store_true", help="exit 1 if a kernel breaks its header's claims")
    parser.add_argument("--write", metavar="MD", help="write the table (markdown) to this file")
    parser.add_argument("--compare", metavar="MD", help="exit 1 unless this committed table is current")
    args = parser.parse_args(argv)
    with open(args.log) as f:
        log = f.read()
    kernels = parse(log)
    version = re.search(r"^nvcc: (.*)$", log, re.M)
    if not kernels:
        print(f"{args.log}: no ptxas resource lines (was it compiled with -Xptxas -v?)")
        return 1
    report = table(kernels, version.group(1) if version else "nvcc version not in the log")
    print(report, end="")
    print(f"{len(kernels)} kernel instances in {len({k.file for k in kernels})} files")
    status = 0
    if args.check:
        problems = check(kernels)
        for problem in problems:
            print("FAIL", problem)
        status |= bool(problems)
    if args.write:
        with open(args.write, "w") as f:
            f.write(report)
    if args.compare:
        with open(args.compare) as f:
            committed = f.read()
        if committed != report:
            print(f"{args.compare} is out of date: regenerate it with\n  bash .ci/compile_cuda.sh > nvcc.log "
                  f"&& python tools/cuda_resources.py nvcc.log --write {args.compare}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
