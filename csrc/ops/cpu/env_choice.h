#pragma once
// A process-wide setting of the CPU kernels chosen by an environment variable when first asked, and
// switchable later: the CPU capability (ops/cpu/cpu_capability.h) and the GEMM route
// (ops/cpu/gemm_route.h).  A value that cannot be used is remembered as a one-line error that every
// read raises until a switch sets a usable value: no silent fallback to another setting.
#include <c10/util/Exception.h>
#include <c10/util/env.h>

#include <atomic>
#include <string>
#include <utility>

namespace keypointops {

// What a variable's value resolves to: a setting >= 0, or -1 and why it cannot be used.
struct EnvResolution {
  int setting;
  std::string error;
};

class EnvChoice {
 public:
  // `resolve(value)` gets the variable's value, "" when it is unset or empty.
  template <typename Resolve>
  EnvChoice(const char* variable, Resolve&& resolve) {
    const auto requested = c10::utils::get_env(variable);
    EnvResolution resolved = std::forward<Resolve>(resolve)(requested.value_or(std::string()));
    if (resolved.setting >= 0) {
      setting_ = resolved.setting;
    } else {
      error_ = std::move(resolved.error);
    }
  }

  // The setting in force; raises the variable's error when it had none usable.
  int get() const {
    const int setting = setting_.load(std::memory_order_relaxed);
    TORCH_CHECK(setting >= 0, error_);
    return setting;
  }

  void set(int setting) { setting_.store(setting); }

 private:
  std::atomic<int> setting_{-1};
  std::string error_;  // written once, before any read of setting_ can see it
};

}  // namespace keypointops
