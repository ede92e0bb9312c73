#pragma once
// Runtime choice among the builds of the CPU kernels for different vector instruction sets, as
// ATen dispatches its own CPU kernels (ATen/native/DispatchStub.h).
//
// Every csrc/ops/cpu/<op>_kernel.cpp is compiled once per capability: DEFAULT (no instruction-set
// flags: any CPU of the architecture), and on x86-64 also AVX2 (-mavx2 -mfma -mf16c) and AVX512
// (-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c, ATen's set), each with
// -DCPU_CAPABILITY=<name> -DCPU_CAPABILITY_<name>.  The macros select the width of
// at::vec::Vectorized (8 floats with AVX2, 16 with AVX512) and name the namespace
// keypointops::CPU_CAPABILITY that holds everything of the build that depends on the width, so the
// builds' definitions never merge at link time.  Each build adds its kernels to the table of its
// op (CpuKernel<Op, Signature>::variants, one slot per capability) while the library loads; the
// DEFAULT build alone registers the op with torch, with CpuKernel::dispatch, which calls the slot
// of active_cpu_capability().
//
// The capability is chosen once, on the first call: KEYPOINTOPS_CPU_CAPABILITY (default, avx2 or
// avx512) when set, else the widest capability that the CPU supports, that this library was built
// with, and that ATen itself uses (so ATEN_CPU_CAPABILITY=avx2 or default also narrows these
// kernels).  An unknown value, or a capability the CPU or the build lacks, makes every CPU kernel
// raise a one-line RuntimeError: it never falls back silently.
//
// Inline functions of shared headers (torch, ops/*.h) are compiled into every build too; of their
// copies the linker keeps the first it meets, so the sources without instruction-set flags are
// linked before the AVX2 and AVX512 objects (setup.py, CMakeLists.txt).
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>
#include <utility>

namespace keypointops {

enum class CpuCapability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };
constexpr int kCpuCapabilities = 3;

// The capability the CPU kernels run with; raises the one-line error of a bad
// KEYPOINTOPS_CPU_CAPABILITY.
CpuCapability active_cpu_capability();

// Records that the kernels of `capability` are in this library (called while it loads).
void add_built_cpu_capability(CpuCapability capability);

// The ops keypointops::_cpu_capability and keypointops::_set_cpu_capability: the active
// capability's name ("default", "avx2", "avx512"), and a switch to another one, which raises a
// one-line error for a name that is unknown or that the CPU or the build does not support.
std::string cpu_capability_name();
void set_cpu_capability(const std::string& name);

// The variants of one CPU kernel with signature Fn, Op a tag type naming the op.
template <typename Op, typename Fn>
struct CpuKernel;

template <typename Op, typename Ret, typename... Args>
struct CpuKernel<Op, Ret(Args...)> {
  using Fn = Ret (*)(Args...);
  // Constant-initialised (all null) before any build's registration runs at load time.
  static inline Fn variants[kCpuCapabilities] = {};

  static bool add(CpuCapability capability, Fn fn) {
    variants[static_cast<int>(capability)] = fn;
    add_built_cpu_capability(capability);
    return true;
  }

  static Ret dispatch(Args... args) {
    const Fn fn = variants[static_cast<int>(active_cpu_capability())];
    // Every kernel file is built for the same capabilities, and only built ones become active.
    TORCH_INTERNAL_ASSERT(fn != nullptr);
    return fn(std::forward<Args>(args)...);
  }
};

}  // namespace keypointops

#define KEYPOINTOPS_CPU_CAPABILITY_ENUM_(name) ::keypointops::CpuCapability::name
#define KEYPOINTOPS_CPU_CAPABILITY_ENUM(name) KEYPOINTOPS_CPU_CAPABILITY_ENUM_(name)

// At namespace keypointops scope, after the kernels (in keypointops::CPU_CAPABILITY): adds kernel
// `fn` of op `op` to the op's table under this build's capability.  Registering op with torch
// (TORCH_LIBRARY_IMPL in the DEFAULT build only) takes KEYPOINTOPS_CPU_DISPATCH(op, fn).
#define KEYPOINTOPS_CPU_KERNEL(op, fn)                                                               \
  struct op##_cpu_kernel;                                                                            \
  [[maybe_unused]] static const bool op##_cpu_kernel_added =                                         \
      CpuKernel<op##_cpu_kernel, std::remove_pointer_t<decltype(&fn)>>::add(                         \
          KEYPOINTOPS_CPU_CAPABILITY_ENUM(CPU_CAPABILITY), &fn);
#define KEYPOINTOPS_CPU_DISPATCH(op, fn) \
  (&CpuKernel<op##_cpu_kernel, std::remove_pointer_t<decltype(&fn)>>::dispatch)
