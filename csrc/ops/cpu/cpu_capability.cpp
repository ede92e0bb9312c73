// The choice of the CPU kernels' capability (ops/cpu/cpu_capability.h).  Compiled without
// instruction-set flags: it runs before anything is known about the CPU.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include "ops/cpu/cpu_capability.h"

#include <ATen/Version.h>

#include <atomic>
#include <string>

#include "ops/cpu/env_choice.h"

namespace keypointops {
namespace {

constexpr const char* kNames[kCpuCapabilities] = {"default", "avx2", "avx512"};
constexpr const char* kEnvVar = "KEYPOINTOPS_CPU_CAPABILITY";

// Bit c: the kernels of capability c are in this library.  Constant-initialised, so that the
// builds' registrations may run before this file's dynamic initialisation.
std::atomic<int> built_capabilities{0};

bool is_built(CpuCapability capability) {
  return (built_capabilities.load() >> static_cast<int>(capability)) & 1;
}

// The first CPU feature that `capability` needs and the CPU (with its operating system) lacks, or
// "" when it has them all: the features the compiler flags of that build may use.
std::string missing_cpu_feature(CpuCapability capability) {
  if (capability == CpuCapability::DEFAULT) return "";
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2")) return "avx2";
  if (!__builtin_cpu_supports("fma")) return "fma";
  if (!__builtin_cpu_supports("f16c")) return "f16c";
  if (capability == CpuCapability::AVX2) return "";
  if (!__builtin_cpu_supports("avx512f")) return "avx512f";
  if (!__builtin_cpu_supports("avx512bw")) return "avx512bw";
  if (!__builtin_cpu_supports("avx512vl")) return "avx512vl";
  if (!__builtin_cpu_supports("avx512dq")) return "avx512dq";
  return "";
#else
  return "x86-64";
#endif
}

// "" when `capability` can run here, else why not (one line, after "<what> needs ...").
std::string unusable_reason(CpuCapability capability) {
  const std::string missing = missing_cpu_feature(capability);
  if (!missing.empty()) return "a CPU with " + missing + ", which this CPU lacks";
  if (!is_built(capability)) return "a build that has these kernels (this build has none for it)";
  return "";
}

// The capability named `name` (as in kNames), or -1.
int parse(const std::string& name) {
  for (int c = 0; c < kCpuCapabilities; ++c) {
    if (name == kNames[c]) return c;
  }
  return -1;
}

// ATen's own capability (ATEN_CPU_CAPABILITY and the CPU): the widest one chosen by default.
int aten_capability() {
  const std::string aten = at::get_cpu_capability();
  if (aten == "AVX512") return static_cast<int>(CpuCapability::AVX512);
  if (aten == "AVX2") return static_cast<int>(CpuCapability::AVX2);
  return static_cast<int>(CpuCapability::DEFAULT);
}

EnvChoice& choice() {
  static EnvChoice instance(kEnvVar, [](const std::string& requested) -> EnvResolution {
    if (requested.empty()) {
      int c = aten_capability();
      while (c > 0 && !unusable_reason(static_cast<CpuCapability>(c)).empty()) --c;
      return {c, ""};
    }
    const int c = parse(requested);
    if (c < 0) {
      return {-1, std::string("keypointops: ") + kEnvVar + "='" + requested +
                      "' is not a CPU capability (expected default, avx2 or avx512)"};
    }
    const std::string reason = unusable_reason(static_cast<CpuCapability>(c));
    if (!reason.empty()) return {-1, std::string("keypointops: ") + kEnvVar + "=" + requested + " needs " + reason};
    return {c, ""};
  });
  return instance;
}

}  // namespace

void add_built_cpu_capability(CpuCapability capability) {
  built_capabilities.fetch_or(1 << static_cast<int>(capability));
}

CpuCapability active_cpu_capability() {
  return static_cast<CpuCapability>(choice().get());
}

std::string cpu_capability_name() {
  return kNames[static_cast<int>(active_cpu_capability())];
}

void set_cpu_capability(const std::string& name) {
  const int c = parse(name);
  TORCH_CHECK(c >= 0, "keypointops: '", name, "' is not a CPU capability (expected default, avx2 or avx512)");
  const std::string reason = unusable_reason(static_cast<CpuCapability>(c));
  TORCH_CHECK(reason.empty(), "keypointops: CPU capability ", name, " needs ", reason);
  choice().set(c);
}

}  // namespace keypointops
