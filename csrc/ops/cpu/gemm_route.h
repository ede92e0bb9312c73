#pragma once
// Where the CPU kernels send work that is a matrix product: PyTorch's GEMM library (at::bmm and
// at::mm, oneMKL in PyTorch's x86-64 wheels) or their own register-blocked loops.
//
// oneMKL picks its GEMM kernels by CPU vendor as well as by instruction set: on an Intel CPU it
// runs its full-width kernels, which beat window_graph_conv's loops; on other vendors' CPUs it runs
// kernels at less than half that rate, which the loops beat (docs/benchmarks.md).  "auto", the
// default, therefore takes the library where oneMKL runs its Intel kernels (asked from oneMKL's own
// vendor test, so bench/mkl_intel_kernels.c, which replaces that test, moves both together) and the
// loops everywhere else: another BLAS, another architecture, a build without oneMKL.
// KEYPOINTOPS_CPU_GEMM=library|own|auto chooses when the library loads; an unknown value makes every
// kernel that asks raise a one-line RuntimeError (no silent fallback).
#include <string>

namespace keypointops {

enum class GemmRoute : int { OWN = 0, LIBRARY = 1 };

// The route in force; raises the one-line error of a bad KEYPOINTOPS_CPU_GEMM.
GemmRoute active_gemm_route();

// Whether PyTorch's oneMKL runs the GEMM kernels it runs on Intel CPUs (false without oneMKL).
bool onemkl_runs_intel_kernels();

// The ops keypointops::_cpu_gemm_route and keypointops::_set_cpu_gemm_route: the route in force
// ("library" or "own") and a switch ("library", "own" or "auto"), for tests and measurements.
std::string gemm_route_name();
void set_gemm_route(const std::string& name);

}  // namespace keypointops
