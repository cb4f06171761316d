// Scratch memory that starts on a 64-byte cache line, left uninitialised. Tile and vector loads
// of rows that straddle two lines cost more: on the AMX Xeon a 1 KB tileloadd from a buffer 16
// bytes off a line took ~3x as long as an aligned one (make bench-amx), and the bf16 prefill ran
// ~1.4x slower, the fp32 one ~6% (new[] and std::vector only promise 16 bytes).
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <type_traits>

namespace beacon_cpu {

constexpr std::size_t kLineBytes = 64;

struct LineFree {
  void operator()(void* p) const { ::operator delete(p, std::align_val_t(kLineBytes)); }
};

template <typename T>
using LineBuffer = std::unique_ptr<T[], LineFree>;

// n elements of T, not initialised (every user writes before it reads).
template <typename T>
LineBuffer<T> line_buffer(std::size_t n) {
  static_assert(std::is_trivially_default_constructible_v<T>, "scratch of plain numbers only");
  return LineBuffer<T>(static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kLineBytes))));
}

// n elements of T rounded up to whole lines: pieces carved one after another out of a
// line_buffer then all start on a line.
template <typename T>
constexpr std::size_t whole_lines(std::size_t n) {
  constexpr std::size_t per_line = kLineBytes / sizeof(T);
  return (n + per_line - 1) / per_line * per_line;
}

}  // namespace beacon_cpu
