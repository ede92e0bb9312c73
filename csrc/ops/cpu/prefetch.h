#pragma once
// Software prefetch of one cache line, for the kernels' reads at addresses the hardware prefetcher
// cannot predict (rows gathered through an index, planes a few channels ahead).
//
// An asm statement on x86-64 instead of __builtin_prefetch: GCC (12, -O1 and above) deletes
// __builtin_prefetch calls together with the loop around them in some inlined loops, the builtin
// having no effect the program can observe (msg_pass's loop over the next nodes' source rows is
// one: with the builtin it compiles to no prefetch instruction).  A volatile asm statement is never
// removed, so every prefetch written in a kernel is one instruction in the build.
namespace keypointops {

inline void prefetch_line(const void* address) {
#if defined(__GNUC__) && defined(__x86_64__)
  // A memory operand, so that the address is folded into the instruction as the builtin's is
  // (prefetch never faults, whatever the address).
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(address)));
#elif defined(__GNUC__)
  __builtin_prefetch(address);
#else
  (void)address;
#endif
}

}  // namespace keypointops
