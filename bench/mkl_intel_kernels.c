/* Makes oneMKL run the kernels it runs on an Intel CPU of the same instruction set, on any x86-64
 * CPU, for benchmarks only (tools/cpu_report.sh with KEYPOINTOPS_MKL_INTEL_KERNELS=1 builds it and
 * preloads it).
 *
 * oneMKL picks its GEMM kernels by CPU vendor as well as by instruction set: on an AMD CPU with
 * AVX-512 it runs its kernels for other vendors' CPUs, at less than half the float32 matmul rate of
 * its AVX-512 kernels on the same cores.  PyTorch's CPU wheels link oneMKL statically but export its
 * internal vendor tests, so preloaded definitions take their place (the first decides the kernels,
 * the second what oneMKL's verbose banner, read by bench/machine.py, reports).  Under it, an AMD
 * machine measures the fused ops against the GEMM baselines (softmax + bmm, unfold + einsum) that a
 * user of an Intel Xeon with the same vector width gets; what is not emulated is everything else
 * about the Intel CPU (its caches, memory, clocks, and AMX, which oneMKL does not use for float32 GEMMs).
 *   cc -shared -fPIC -O2 -o libmkl_intel_kernels.so bench/mkl_intel_kernels.c
 *   LD_PRELOAD=$PWD/libmkl_intel_kernels.so python bench/machine.py   # "its GEMMs: oneMKL, AVX-512 kernels"
 */
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
