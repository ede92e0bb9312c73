// The CPU kernels' GEMM route (ops/cpu/gemm_route.h).  Compiled once, without instruction-set flags.
#include "ops/cpu/gemm_route.h"

#include <c10/util/Exception.h>

#include <string>

#include "ops/cpu/env_choice.h"

#if defined(__linux__) && defined(__x86_64__)
// oneMKL's vendor test, exported by the libtorch_cpu of PyTorch's x86-64 wheels, which link oneMKL
// statically; weak, so a torch without it (another BLAS) leaves it null.
extern "C" int mkl_serv_intel_cpu_true(void) __attribute__((weak));
#endif

namespace keypointops {
namespace {

constexpr const char* kEnvVar = "KEYPOINTOPS_CPU_GEMM";

// -1: "auto"; else a GemmRoute; -2: unparsable.
int parse(const std::string& name) {
  if (name == "auto") return -1;
  if (name == "own") return static_cast<int>(GemmRoute::OWN);
  if (name == "library") return static_cast<int>(GemmRoute::LIBRARY);
  return -2;
}

int auto_route() {
  return static_cast<int>(onemkl_runs_intel_kernels() ? GemmRoute::LIBRARY : GemmRoute::OWN);
}

EnvChoice& choice() {
  static EnvChoice instance(kEnvVar, [](const std::string& requested) -> EnvResolution {
    const int r = requested.empty() ? -1 : parse(requested);
    if (r == -2) {
      return {-1, std::string("keypointops: ") + kEnvVar + "='" + requested +
                      "' is not a GEMM route (expected library, own or auto)"};
    }
    return {r == -1 ? auto_route() : r, ""};
  });
  return instance;
}

}  // namespace

bool onemkl_runs_intel_kernels() {
#if defined(__linux__) && defined(__x86_64__)
  return mkl_serv_intel_cpu_true != nullptr && mkl_serv_intel_cpu_true() == 1;
#else
  return false;
#endif
}

GemmRoute active_gemm_route() {
  return static_cast<GemmRoute>(choice().get());
}

std::string gemm_route_name() {
  return active_gemm_route() == GemmRoute::LIBRARY ? "library" : "own";
}

void set_gemm_route(const std::string& name) {
  const int r = parse(name);
  TORCH_CHECK(r != -2, "keypointops: '", name, "' is not a GEMM route (expected library, own or auto)");
  choice().set(r == -1 ? auto_route() : r);
}

}  // namespace keypointops
