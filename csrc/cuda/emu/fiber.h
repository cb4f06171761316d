// Fibers for the emulated CUDA threads: a stack each and a small hand-written context switch
// (callee-saved registers + the floating-point control words; glibc's swapcontext makes a
// system call per switch and would dominate the emulation's cost). ASan builds announce every
// switch to the sanitizer (fake stacks, stack bounds).
#pragma once

#include <cstddef>

namespace beacon {
namespace emu {

struct Fiber {
  void* sp = nullptr;          // saved stack pointer while switched out
  void* stack_lo = nullptr;    // usable stack [stack_lo, stack_lo + stack_size), null: the OS thread's
  size_t stack_size = 0;
  void* mapping = nullptr;     // the mmap'ed region (guard page + stack)
  size_t mapping_size = 0;
  void* asan_fake_stack = nullptr;
};

// Allocates `f`'s stack (once; a guard page below it).
void fiber_allocate(Fiber& f, size_t stack_size);
void fiber_free(Fiber& f);
// Prepares `f` to run entry() on its own stack at the next switch to it. entry must never
// return: it ends by switching away for good (fiber_exit).
void fiber_prepare(Fiber& f, void (*entry)());
// Saves the current context into `from` and resumes `to`.
void fiber_switch(Fiber& from, Fiber& to);
// Like fiber_switch, for a fiber that never runs again.
[[noreturn]] void fiber_exit(Fiber& from, Fiber& to);
// The first thing entry() calls on a fresh fiber (sanitizer bookkeeping).
void fiber_started(Fiber& self, Fiber& from);

}  // namespace emu
}  // namespace beacon
