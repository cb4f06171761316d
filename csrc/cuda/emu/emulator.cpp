// The CUDA execution-model emulation: see emulator.h.
#include "cuda/emu/emulator.h"

#include <algorithm>
#include <cstdio>
#include <deque>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include "cuda/emu/fiber.h"

namespace beacon {
namespace emu {
namespace detail {
uint3 g_thread_idx{0, 0, 0};
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim{1, 1, 1};
dim3 g_grid_dim{1, 1, 1};
}  // namespace detail

namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxSmem = 227 * 1024;   // sm_90 per-block opt-in limit
constexpr size_t kDefaultSmem = 48 * 1024;  // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr uint32_t kNever = 0xffffffffu;

// ---- configuration
Schedule g_schedule = Schedule::kForward;
uint64_t g_seed = 0;
int g_sms = 16;
int64_t g_launches = 0;
std::unordered_map<const void*, int> g_max_smem;

// ---- per-thread state
struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  bool pred;
};

enum class State { kReady, kAtBarrier, kAtWarp, kDone };

struct Thread {
  Fiber fiber;
  uint3 idx{};
  int linear = 0, warp = 0, lane = 0;
  State state = State::kReady;
  // Warp-collective operands and results.
  int op = 0;
  uint64_t in_bits = 0, out_bits = 0;
  int in_arg = 0, in_width = 0;
  unsigned in_mask = 0;
  const void* in_ptr = nullptr;
  uint32_t a[4] = {}, b[2] = {}, r[4] = {};
  float c[4] = {};
  // cp.async: the open (uncommitted) group and the committed, not yet retired groups.
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};

// Per-byte shadow of the block's dynamic shared memory.
struct SmemShadow {
  int16_t writer = -1, reader = -1, inflight = -1;
  bool multi = false;
  uint32_t w_epoch = kNever, r_epoch = kNever;
};

// Per-byte shadow of global memory marked by the kernels (one launch).
struct GlobalShadow {
  int32_t w_block = -1, r_block = -1;
  int16_t w_tid = -1, r_tid = -1;
  uint32_t w_epoch = 0, r_epoch = 0;
  bool r_multi = false, r_cross = false;
};
constexpr uintptr_t kPageBits = 12;
struct GlobalPage {
  GlobalShadow bytes[size_t{1} << kPageBits];
};

enum Op : int { kOpNone = 0, kOpSyncwarp, kOpShfl, kOpLdmatrix, kOpLdmatrixT, kOpMmaBf16, kOpMmaF16 };
const char* op_name(int op) {
  switch (op) {
    case kOpSyncwarp: return "__syncwarp";
    case kOpShfl: return "__shfl_*_sync";
    case kOpLdmatrix: return "ldmatrix.x4";
    case kOpLdmatrixT: return "ldmatrix.x4.trans";
    case kOpMmaBf16: return "mma.sync.m16n8k16 (bf16)";
    case kOpMmaF16: return "mma.sync.m16n8k16 (f16)";
    default: return "?";
  }
}
const char* barrier_name(int kind) {
  static const char* names[] = {"__syncthreads", "__syncthreads_or", "__syncthreads_and", "__syncthreads_count"};
  return names[kind];
}

// ---- the running launch
struct Run {
  const char* name = "";
  dim3 grid, block;
  int n = 0;               // threads per block
  int block_linear = 0;    // this block's ordinal in the launch
  std::vector<Thread> threads;
  Thread* cur = nullptr;
  Fiber scheduler;
  const std::function<void()>* body = nullptr;
  bool failed = false;
  std::string error;
  // barrier
  int n_done = 0, n_at_barrier = 0, barrier_kind = 0, vote = 0, barrier_result = 0;
  uint32_t epoch = 0;
  // warps
  std::vector<int> warp_arrived, warp_op, warp_done, warp_size;
  // shared memory
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<SmemShadow> shadow;
  // global memory
  std::unordered_map<uintptr_t, std::unique_ptr<GlobalPage>> global;
};
Run* g_run = nullptr;
std::vector<Fiber> g_stacks;  // reused between blocks and launches

std::string thread_name(const Thread& t) {
  std::ostringstream s;
  s << "thread (" << t.idx.x << "," << t.idx.y << "," << t.idx.z << ") of block (" << detail::g_block_idx.x << ","
    << detail::g_block_idx.y << "," << detail::g_block_idx.z << ")";
  return s.str();
}

Run& run() {
  if (g_run == nullptr || g_run->cur == nullptr) {
    throw std::runtime_error("cuda emulation: a device function was called outside a kernel");
  }
  return *g_run;
}

// Switches from the current thread back to the scheduler until the thread is resumed.
void yield() {
  Run& R = *g_run;
  Thread* self = R.cur;
  fiber_switch(self->fiber, R.scheduler);
}

void thread_entry() {
  Run& R = *g_run;
  Thread* self = R.cur;
  fiber_started(self->fiber, R.scheduler);
  std::string error;
  try {
    (*R.body)();
  } catch (const std::exception& e) {  // never unwind across the fiber's stack boundary
    error = e.what();
  }
  if (!error.empty()) fail(thread_name(*self) + ": " + error);
  // Exit: retire outstanding copies (they still land), then check nobody waits for us.
  self->groups.push_back(std::move(self->open));
  self->open.clear();
  cp_async_wait(0);
  self->state = State::kDone;
  ++R.n_done;
  ++R.warp_done[self->warp];
  if (R.n_at_barrier > 0) {
    fail(thread_name(*self) + " exited while other threads of its block wait at " + barrier_name(R.barrier_kind));
  }
  if (R.warp_arrived[self->warp] > 0) {
    fail(thread_name(*self) + " exited while lanes of its warp wait in " + op_name(R.warp_op[self->warp]));
  }
  fiber_exit(self->fiber, R.scheduler);
}

std::vector<int> order(int n, std::mt19937_64* rng) {
  std::vector<int> o(n);
  std::iota(o.begin(), o.end(), 0);
  if (g_schedule == Schedule::kReverse) std::reverse(o.begin(), o.end());
  if (g_schedule == Schedule::kRandom) std::shuffle(o.begin(), o.end(), *rng);
  return o;
}

void run_block(Run& R, std::mt19937_64& rng) {
  R.n_done = R.n_at_barrier = 0;
  R.epoch = 0;
  std::fill(R.warp_arrived.begin(), R.warp_arrived.end(), 0);
  std::fill(R.warp_done.begin(), R.warp_done.end(), 0);
  if (R.smem_bytes > 0) {
    std::memset(R.smem, 0xff, R.smem_bytes);  // never-written bytes read as NaN
    std::fill(R.shadow.begin(), R.shadow.end(), SmemShadow{});
  }
  for (int i = 0; i < R.n; ++i) {
    Thread& t = R.threads[i];
    t.state = State::kReady;
    t.open.clear();
    t.groups.clear();
    fiber_prepare(t.fiber, &thread_entry);
  }
  while (R.n_done < R.n) {
    bool ran = false;
    for (int i : order(R.n, &rng)) {
      Thread& t = R.threads[i];
      if (t.state != State::kReady) continue;
      ran = true;
      R.cur = &t;
      detail::g_thread_idx = t.idx;
      fiber_switch(R.scheduler, t.fiber);
      R.cur = nullptr;
      if (R.failed) return;
    }
    if (!ran) {
      std::ostringstream s;
      s << "deadlock: " << R.n_at_barrier << " thread(s) wait at " << barrier_name(R.barrier_kind) << ", ";
      int in_warp = 0;
      for (const Thread& t : R.threads) in_warp += t.state == State::kAtWarp;
      s << in_warp << " in warp collectives, " << R.n_done << " exited, of " << R.n;
      R.failed = true;
      R.error = s.str();
      return;
    }
  }
}

// ---- shared-memory shadow
SmemShadow& smem_byte(Run& R, const void* p, size_t bytes, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (R.smem == nullptr || c < R.smem || c + bytes > R.smem + R.smem_bytes) {
    fail(std::string(what) + ": address is not in the block's dynamic shared memory (" + thread_name(*R.cur) + ")");
  }
  return R.shadow[c - R.smem];
}

void smem_read(Run& R, const void* p, size_t bytes, int16_t tid, const char* what) {
  SmemShadow* s = &smem_byte(R, p, bytes, what);
  for (size_t i = 0; i < bytes; ++i, ++s) {
    if (s->inflight >= 0) {
      fail(std::string(what) + " by " + thread_name(R.threads[tid]) + " reads shared bytes whose cp.async (thread " +
           std::to_string(s->inflight) + ") was not retired by cp.async.wait_group");
    }
    if (s->w_epoch == kNever) {
      fail(std::string(what) + " by " + thread_name(R.threads[tid]) + " reads shared bytes never written");
    }
    if (s->w_epoch == R.epoch && s->writer != tid) {
      fail(std::string(what) + ": shared-memory race: " + thread_name(R.threads[tid]) + " reads bytes thread " +
           std::to_string(s->writer) + " wrote since the last barrier");
    }
    if (s->r_epoch == R.epoch) {
      if (s->reader != tid) s->multi = true;
    } else {
      s->r_epoch = R.epoch;
      s->reader = tid;
      s->multi = false;
    }
  }
}

// A write to shared memory: issued (inflight) or landed (!inflight).
void smem_write(Run& R, void* p, size_t bytes, int16_t tid, bool issue, const char* what) {
  SmemShadow* s = &smem_byte(R, p, bytes, what);
  for (size_t i = 0; i < bytes; ++i, ++s) {
    if (issue && s->inflight >= 0) {
      fail(std::string(what) + ": shared-memory race: two cp.async in flight to the same bytes (threads " +
           std::to_string(s->inflight) + ", " + std::to_string(tid) + ")");
    }
    if (s->w_epoch == R.epoch && s->writer != tid) {
      fail(std::string(what) + ": shared-memory race: threads " + std::to_string(s->writer) + " and " +
           std::to_string(tid) + " write the same bytes between two barriers");
    }
    if (s->r_epoch == R.epoch && (s->reader != tid || s->multi)) {
      fail(std::string(what) + ": shared-memory race: thread " + std::to_string(tid) +
           " writes bytes another thread read since the last barrier");
    }
    if (issue) {
      s->inflight = tid;
    } else {
      s->inflight = -1;
      s->writer = tid;
      s->w_epoch = R.epoch;
    }
  }
}

// ---- warp collectives: every lane of the warp arrives, the last one computes for all.
template <typename F>
void warp_collective(int op, F&& compute) {
  Run& R = run();
  Thread& self = *R.cur;
  const int w = self.warp;
  if (R.warp_done[w] > 0) {
    fail(std::string(op_name(op)) + " in a warp with exited lanes (" + thread_name(self) + ")");
  }
  if (R.n_at_barrier > 0) {
    // A lane at the barrier can never join: reported as a deadlock by the scheduler.
  }
  if (R.warp_arrived[w] == 0) {
    R.warp_op[w] = op;
  } else if (R.warp_op[w] != op) {
    fail(std::string("divergent warp: ") + thread_name(self) + " is in " + op_name(op) + " while other lanes are in " +
         op_name(R.warp_op[w]));
  }
  self.op = op;
  if (++R.warp_arrived[w] < R.warp_size[w]) {
    self.state = State::kAtWarp;
    yield();
    return;
  }
  Thread* lanes = &R.threads[w * 32];
  compute(lanes, R.warp_size[w]);
  R.warp_arrived[w] = 0;
  for (int l = 0; l < R.warp_size[w]; ++l) lanes[l].state = State::kReady;
}

void check_full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail(std::string(what) + ": only the full-warp mask 0xffffffff is emulated");
}

float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float f16_bits_to_float(uint16_t h) {
  __half_raw raw;
  raw.x = h;
  return __half2float(__half(raw));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
void set_schedule(Schedule schedule, uint64_t seed) {
  g_schedule = schedule;
  g_seed = seed;
}
void set_sm_count(int sms) { g_sms = std::max(1, sms); }
int sm_count() { return g_sms; }
int64_t launch_count() { return g_launches; }
void set_max_dynamic_smem(const void* kernel, int bytes) { g_max_smem[kernel] = bytes; }

void fail(const std::string& message) {
  if (g_run == nullptr || g_run->cur == nullptr) throw std::runtime_error("cuda emulation: " + message);
  Run& R = *g_run;
  if (!R.failed) {
    R.failed = true;
    R.error = message;
  }
  fiber_exit(R.cur->fiber, R.scheduler);  // the thread is abandoned; the launch reports
}

unsigned char* dynamic_smem() {
  Run& R = run();
  return R.smem;
}

int barrier(BarrierKind kind_enum, int predicate) {
  Run& R = run();
  Thread& self = *R.cur;
  const int kind = static_cast<int>(kind_enum);
  if (R.n_done > 0) {
    fail(thread_name(self) + " reaches " + barrier_name(kind) + " after " + std::to_string(R.n_done) +
         " thread(s) of its block exited");
  }
  if (R.n_at_barrier == 0) {
    R.barrier_kind = kind;
    R.vote = kind == 2 ? 1 : 0;
  } else if (R.barrier_kind != kind) {
    fail(std::string("divergent barriers: ") + thread_name(self) + " is at " + barrier_name(kind) +
         " while others wait at " + barrier_name(R.barrier_kind));
  }
  if (kind == 1) R.vote |= predicate;
  if (kind == 2) R.vote &= predicate;
  if (kind == 3) R.vote += predicate;
  if (++R.n_at_barrier < R.n) {
    self.state = State::kAtBarrier;
    yield();
    return R.barrier_result;
  }
  R.barrier_result = R.vote;
  R.n_at_barrier = 0;
  ++R.epoch;
  for (Thread& t : R.threads) {
    if (t.state == State::kAtBarrier) t.state = State::kReady;
  }
  return R.barrier_result;
}

void syncwarp(unsigned mask) {
  check_full_mask(mask, "__syncwarp");
  warp_collective(kOpSyncwarp, [](Thread*, int) {});
}

uint64_t shfl(unsigned mask, uint64_t bits, ShflKind kind, int arg, int width) {
  check_full_mask(mask, "__shfl_*_sync");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("__shfl_*_sync: width must be a power of 2 <= 32");
  Thread& self = *run().cur;
  self.in_bits = bits;
  self.in_arg = arg + (static_cast<int>(kind) << 8);
  self.in_width = width;
  warp_collective(kOpShfl, [](Thread* lanes, int n) {
    for (int l = 0; l < n; ++l) {
      Thread& t = lanes[l];
      const int k = t.in_arg >> 8, a = t.in_arg & 0xff, w = t.in_width;
      const int base = l & ~(w - 1);  // first lane of this lane's segment
      int src = l;
      switch (static_cast<ShflKind>(k)) {
        case ShflKind::kIdx: src = base + (a & (w - 1)); break;
        case ShflKind::kXor: src = l ^ a; if (src >= base + w) src = l; break;  // later segments: own value
        case ShflKind::kUp: src = l - a; if (src < base) src = l; break;
        case ShflKind::kDown: src = l + a; if (src >= base + w) src = l; break;
      }
      if (src < 0 || src >= n) src = l;
      t.out_bits = lanes[src].in_bits;
    }
  });
  return self.out_bits;
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane i gives the address of row i % 8 of
// matrix i / 8 (16 contiguous bytes). Without .trans, lane l receives in register j the
// elements (row l / 4, cols 2 (l % 4), 2 (l % 4) + 1) of matrix j; with .trans, those of the
// transposed matrix: (rows 2 (l % 4), 2 (l % 4) + 1, col l / 4). Lower column/row in the low half.
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans) {
  Run& R = run();
  Thread& self = *R.cur;
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0) fail("ldmatrix: row address not 16-byte aligned");
  smem_byte(R, smem, 16, "ldmatrix");
  self.in_ptr = smem;
  warp_collective(trans ? kOpLdmatrixT : kOpLdmatrix, [trans, &R](Thread* lanes, int n) {
    if (n != 32) fail("ldmatrix: needs a full warp");
    // The warp reads when all its lanes are here (each lane's row, checked as that lane's read).
    for (int i = 0; i < 32; ++i) {
      smem_read(R, lanes[i].in_ptr, 16, static_cast<int16_t>(lanes[i].linear), trans ? "ldmatrix.trans" : "ldmatrix");
    }
    uint16_t m[4][8][8];
    for (int i = 0; i < 32; ++i) std::memcpy(m[i / 8][i % 8], lanes[i].in_ptr, 16);
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, c = 2 * (l % 4);
      for (int j = 0; j < 4; ++j) {
        const uint16_t lo = trans ? m[j][c][g] : m[j][g][c];
        const uint16_t hi = trans ? m[j][c + 1][g] : m[j][g][c + 1];
        lanes[l].r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
  });
  for (int j = 0; j < 4; ++j) r[j] = self.r[j];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, D = A B + C. Fragments
// (g = lane / 4, c = 2 (lane % 4); element pairs in a register: lower index in the low half):
//   A 16x16: a0 (row g, cols c, c+1), a1 (row g+8, cols c, c+1), a2 (row g, cols c+8, c+9),
//            a3 (row g+8, cols c+8, c+9)
//   B 16x8:  b0 (rows c, c+1, col g), b1 (rows c+8, c+9, col g)
//   C/D 16x8: d0, d1 (row g, cols c, c+1), d2, d3 (row g+8, cols c, c+1)
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Thread& self = *run().cur;
  std::memcpy(self.a, a, sizeof(self.a));
  self.b[0] = b0;
  self.b[1] = b1;
  std::memcpy(self.c, d, sizeof(self.c));
  warp_collective(bf16 ? kOpMmaBf16 : kOpMmaF16, [bf16](Thread* lanes, int n) {
    if (n != 32) fail("mma.sync: needs a full warp");
    auto cvt = [bf16](uint32_t reg, int half) {
      const uint16_t h = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
      return bf16 ? bf16_bits_to_float(h) : f16_bits_to_float(h);
    };
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const Thread& t = lanes[l];
      const int g = l / 4, c = 2 * (l % 4);
      for (int e = 0; e < 2; ++e) {
        A[g][c + e] = cvt(t.a[0], e);
        A[g + 8][c + e] = cvt(t.a[1], e);
        A[g][c + 8 + e] = cvt(t.a[2], e);
        A[g + 8][c + 8 + e] = cvt(t.a[3], e);
        B[c + e][g] = cvt(t.b[0], e);
        B[c + 8 + e][g] = cvt(t.b[1], e);
        C[g][c + e] = t.c[e];
        C[g + 8][c + e] = t.c[2 + e];
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, c = 2 * (l % 4);
      for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = c + (e & 1);
        double s = C[row][col];
        for (int k = 0; k < 16; ++k) s += static_cast<double>(A[row][k]) * B[k][col];
        lanes[l].c[e] = static_cast<float>(s);
      }
    }
  });
  std::memcpy(d, self.c, sizeof(self.c));
}

// cp.async.cg.shared.global [smem], [gmem], 16, src_bytes (16 or 0): the copy is recorded in
// the thread's open group and its destination poisoned; it lands when a cp.async.wait_group
// retires its group.
void cp_async_16(void* smem, const void* gmem, bool pred) {
  Run& R = run();
  Thread& self = *R.cur;
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || reinterpret_cast<uintptr_t>(gmem) % 16 != 0) {
    fail("cp.async 16: addresses must be 16-byte aligned (" + thread_name(self) + ")");
  }
  smem_write(R, smem, 16, static_cast<int16_t>(self.linear), true, "cp.async");
  std::memset(smem, 0xff, 16);
  self.open.push_back(Copy{static_cast<unsigned char*>(smem), static_cast<const unsigned char*>(gmem), pred});
}

void cp_async_commit() {
  Thread& self = *run().cur;
  self.groups.push_back(std::move(self.open));
  self.open.clear();
}

void cp_async_wait(int groups_left) {
  Run& R = run();
  Thread& self = *R.cur;
  while (static_cast<int>(self.groups.size()) > groups_left) {
    for (const Copy& c : self.groups.front()) {
      if (c.pred) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
      smem_write(R, c.dst, 16, static_cast<int16_t>(self.linear), false, "cp.async (landing)");
    }
    self.groups.pop_front();
  }
}

void global_access(const void* p, size_t bytes, bool write) {
  Run& R = run();
  const Thread& self = *R.cur;
  const int32_t blk = R.block_linear;
  const int16_t tid = static_cast<int16_t>(self.linear);
  auto concurrent = [&](int32_t b, int16_t t, uint32_t e) { return b != blk || (e == R.epoch && t != tid); };
  auto addr = reinterpret_cast<uintptr_t>(p);
  for (size_t i = 0; i < bytes; ++i, ++addr) {
    auto& page = R.global[addr >> kPageBits];
    if (!page) page = std::make_unique<GlobalPage>();
    GlobalShadow& s = page->bytes[addr & ((uintptr_t{1} << kPageBits) - 1)];
    const bool w_conflict = s.w_block >= 0 && concurrent(s.w_block, s.w_tid, s.w_epoch);
    if (w_conflict) {
      std::ostringstream m;
      m << "global-memory race in " << R.name << ": " << thread_name(self) << (write ? " writes" : " reads")
        << " bytes written by thread " << s.w_tid << " of block #" << s.w_block << " in the same launch"
        << (s.w_block == blk ? " since the last barrier" : "");
      fail(m.str());
    }
    if (write) {
      const bool r_conflict =
          s.r_block >= 0 && (s.r_cross || (s.r_multi ? (s.r_block != blk || s.r_epoch == R.epoch)
                                                     : concurrent(s.r_block, s.r_tid, s.r_epoch)));
      if (r_conflict) {
        std::ostringstream m;
        m << "global-memory race in " << R.name << ": " << thread_name(self) << " writes bytes read by thread "
          << s.r_tid << " of block #" << s.r_block << (s.r_multi ? " (and others)" : "") << " in the same launch"
          << (s.r_block == blk ? " since the last barrier" : "");
        fail(m.str());
      }
      s.w_block = blk;
      s.w_tid = tid;
      s.w_epoch = R.epoch;
      s.r_block = -1;
      s.r_multi = s.r_cross = false;
    } else if (s.r_block >= 0 && concurrent(s.r_block, s.r_tid, s.r_epoch)) {
      s.r_multi = true;
      s.r_cross = s.r_cross || s.r_block != blk;
    } else if (!(s.r_block == blk && s.r_tid == tid && s.r_epoch == R.epoch)) {
      s.r_block = blk;
      s.r_tid = tid;
      s.r_epoch = R.epoch;
      s.r_multi = s.r_cross = false;
    }
  }
}

void run_kernel(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem_bytes,
                const std::function<void()>& body) {
  ++g_launches;
  const int64_t n = static_cast<int64_t>(block.x) * block.y * block.z;
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  std::string where = std::string("cuda emulation: launch of ") + name + ": ";
  if (n < 1 || n > kMaxThreads) throw std::runtime_error(where + "invalid block size " + std::to_string(n));
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error(where + "invalid grid");
  }
  if (smem_bytes > kMaxSmem) throw std::runtime_error(where + "too much dynamic shared memory");
  if (smem_bytes > kDefaultSmem) {
    auto it = g_max_smem.find(kernel);
    if (it == g_max_smem.end() || static_cast<size_t>(it->second) < smem_bytes) {
      throw std::runtime_error(where + std::to_string(smem_bytes) +
                               " bytes of dynamic shared memory without cudaFuncAttributeMaxDynamicSharedMemorySize");
    }
  }
  if (g_run != nullptr) throw std::runtime_error(where + "launched from inside a kernel");
  Run R;
  R.name = name;
  R.grid = grid;
  R.block = block;
  R.n = static_cast<int>(n);
  R.body = &body;
  R.threads.resize(R.n);
  const int warps = (R.n + 31) / 32;
  R.warp_arrived.assign(warps, 0);
  R.warp_op.assign(warps, 0);
  R.warp_done.assign(warps, 0);
  R.warp_size.assign(warps, 32);
  R.warp_size[warps - 1] = R.n - 32 * (warps - 1);
  if (g_stacks.size() < static_cast<size_t>(R.n)) g_stacks.resize(R.n);
  for (int i = 0; i < R.n; ++i) {
    Thread& t = R.threads[i];
    fiber_allocate(g_stacks[i], kStackBytes);
    t.fiber = g_stacks[i];
    t.idx = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                  static_cast<unsigned>(i / (block.x * block.y))};
    t.linear = i;
    t.warp = i / 32;
    t.lane = i % 32;
  }
  R.smem_bytes = smem_bytes;
  if (smem_bytes > 0) {
    R.smem_storage.resize(smem_bytes + 128);
    auto base = reinterpret_cast<uintptr_t>(R.smem_storage.data());
    R.smem = reinterpret_cast<unsigned char*>((base + 127) & ~uintptr_t{127});
    R.shadow.resize(smem_bytes);
  }
  std::mt19937_64 rng(g_seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(g_launches));
  detail::g_grid_dim = grid;
  detail::g_block_dim = block;
  g_run = &R;
  std::vector<int> block_order = order(static_cast<int>(blocks), &rng);
  for (int bl : block_order) {
    detail::g_block_idx = uint3{static_cast<unsigned>(bl % grid.x), static_cast<unsigned>((bl / grid.x) % grid.y),
                                static_cast<unsigned>(bl / (grid.x * grid.y))};
    R.block_linear = bl;
    run_block(R, rng);
    if (R.failed) break;
  }
  g_run = nullptr;
  if (R.failed) throw std::runtime_error(where + R.error);
}

}  // namespace emu
}  // namespace beacon

// The CUDA runtime functions the kernels' launchers call (hidden: never interposed by a real
// libcudart loaded into the same process).
extern "C" {
__attribute__((visibility("hidden"))) cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
__attribute__((visibility("hidden"))) cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr,
                                                                       int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) beacon::emu::set_max_dynamic_smem(func, value);
  return cudaSuccess;
}
}
