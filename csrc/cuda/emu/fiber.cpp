// Fibers: see fiber.h. x86-64 System V: the switch saves rbp, rbx, r12-r15, MXCSR and the x87
// control word on the old stack and restores them from the new one; other architectures fall
// back to ucontext.
#include "cuda/emu/fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#if defined(__SANITIZE_ADDRESS__)
#define BEACON_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BEACON_EMU_ASAN 1
#endif
#endif
#if BEACON_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if defined(__x86_64__)
extern "C" void beacon_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl beacon_emu_switch
  .hidden beacon_emu_switch
  .type beacon_emu_switch, @function
beacon_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size beacon_emu_switch, .-beacon_emu_switch
)");
#else
#include <ucontext.h>
#endif

namespace beacon {
namespace emu {

void fiber_allocate(Fiber& f, size_t stack_size) {
  if (f.mapping != nullptr) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
#if BEACON_EMU_ASAN
  stack_size *= 4;  // headroom: instrumented frames are larger (a redzone around each stack array)
#endif
  stack_size = (stack_size + page - 1) / page * page;
  const size_t total = stack_size + page;
  void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::runtime_error("cuda emulation: cannot map a fiber stack");
  mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
  f.mapping = m;
  f.mapping_size = total;
  f.stack_lo = static_cast<char*>(m) + page;
  f.stack_size = stack_size;
}

void fiber_free(Fiber& f) {
  if (f.mapping != nullptr) munmap(f.mapping, f.mapping_size);
  f = Fiber{};
}

// A reused stack may hold the poisoned redzones of frames that never returned (a thread that
// exited from inside a function, or one abandoned when its launch failed): clear them.
static void unpoison_stack(Fiber& f) {
#if BEACON_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(f.stack_lo, f.stack_size);
#else
  (void)f;
#endif
}

#if defined(__x86_64__)
void fiber_prepare(Fiber& f, void (*entry)()) {
  unpoison_stack(f);
  auto top = (reinterpret_cast<uintptr_t>(f.stack_lo) + f.stack_size) & ~uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                              // keeps entry's frame 16-byte aligned
  *--sp = reinterpret_cast<void*>(entry);       // `ret` of the switch jumps here
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  --sp;
  const uint32_t mxcsr = 0x1F80, fpucw = 0x037F;  // the ABI's initial control words
  reinterpret_cast<uint32_t*>(sp)[0] = mxcsr;
  reinterpret_cast<uint32_t*>(sp)[1] = fpucw;
  f.sp = sp;
}

static inline void raw_switch(Fiber& from, Fiber& to) { beacon_emu_switch(&from.sp, to.sp); }
#else
void fiber_prepare(Fiber& f, void (*entry)()) {
  unpoison_stack(f);
  auto* ctx = new ucontext_t;  // kept in f.sp (freed with the process; fibers are reused)
  getcontext(ctx);
  ctx->uc_stack.ss_sp = f.stack_lo;
  ctx->uc_stack.ss_size = f.stack_size;
  ctx->uc_link = nullptr;
  makecontext(ctx, entry, 0);
  f.sp = ctx;
}
static inline void raw_switch(Fiber& from, Fiber& to) {
  if (from.sp == nullptr) from.sp = new ucontext_t;
  swapcontext(static_cast<ucontext_t*>(from.sp), static_cast<ucontext_t*>(to.sp));
}
#endif

void fiber_switch(Fiber& from, Fiber& to) {
#if BEACON_EMU_ASAN
  __sanitizer_start_switch_fiber(&from.asan_fake_stack, to.stack_lo, to.stack_size);
  raw_switch(from, to);
  __sanitizer_finish_switch_fiber(from.asan_fake_stack, nullptr, nullptr);
#else
  raw_switch(from, to);
#endif
}

void fiber_exit(Fiber& from, Fiber& to) {
#if BEACON_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, to.stack_lo, to.stack_size);
#endif
  raw_switch(from, to);
  std::abort();  // never resumed
}

void fiber_started(Fiber& self, Fiber& from) {
  (void)self;
#if BEACON_EMU_ASAN
  const void* lo = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &lo, &size);
  if (from.stack_lo == nullptr) {  // the scheduler runs on the OS thread's stack: learn it
    from.stack_lo = const_cast<void*>(lo);
    from.stack_size = size;
  }
#else
  (void)from;
#endif
}

}  // namespace emu
}  // namespace beacon
