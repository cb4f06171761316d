// CPU kernel of torch.ops.beacon.attention: tiled online-softmax (flash-attention style)
// attention of one Activation Beacon step over the condensed cache, no mask tensor.
//
// Work unit: (query tile of one sequence) x (kv head). A tile holds consecutive queries of the
// sequence times the `group` query heads that share the kv head (GQA by index arithmetic: K/V
// are read once per group, never copied), so decode with GQA still has several rows. For every
// key block the rows' spans (beacon_mask.h) classify the block: skipped when no row sees a key
// of it, computed without masks when every row sees all of it, and masked element by element
// only on boundary (partial) blocks. Work units are handed out longest first from an atomic
// counter (at::parallel_for starts the threads): tile costs differ a lot (causal rows, beacon
// rows, varlen batches) and the machines are shared.
// QK^T and PV run in fp32 on K and V (per-block fp32 copies of 16-bit or strided rows) through
// block_gemm.h (an AVX-512 micro-kernel, else torch's BLAS); with bf16 inputs on CPUs with
// AVX-512-BF16, QK^T instead reads K in place by bf16 dot products with fp32 accumulation
// (bf16_gemm.h), and P V multiplies P rounded to bf16 by V in pairs (AMX tiles, else vdpbf16ps); tiles of
// fewer than kSmallRows rows (decode) use dot products straight from the cache. Scores are kept
// transposed (key-major) so the softmax bookkeeping vectorises across rows; those loops live in
// attention_blocks.h, compiled for AVX-512 / AVX2 / baseline and chosen by cpu_isa.h like every
// CPU kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "attn_params.h"
#include "beacon_mask.h"
#include "op_checks.h"
#include "cpu/attention_blocks.h"
#include "cpu/bf16_gemm.h"
#include "cpu/block_gemm.h"
#include "cpu/block_prefetch.h"
#include "cpu/decode_avx512.h"
#include "cpu/line_aligned.h"
#include "cpu/softmax_to_bf16.h"
#include "cpu/step_lengths.h"

namespace {

using beacon::BlockKind;
using beacon::Mode;
using beacon::RowSpans;
using beacon::SeqLens;
using namespace beacon::cpu::attn;

constexpr const char* kOp = "beacon.attention";

// Tile sizes, chosen by timing candidates with `python -m beacon_ops bench attention`.
constexpr int kQueryTileRows = 192;  // rows of a query tile: three 64-wide panels of the 6 x 64 micro-kernel
constexpr int kKeyBlock = 256;       // keys of a key block
// Keys of a decode tile's key block: each block reads K, then V, and every switch restarts the
// hardware prefetchers' streams (Zen 4, 32 query heads over 8 kv heads, 4,608 fp32 keys: 0.65
// of copy bandwidth at 256 keys, 0.72 at 1024, 0.70 at 2048).
constexpr int kDecodeKeyBlock = 1024;
// The same for bf16 tiles that take decode_qk_bf16 and pv_stream (dec_qk_dot below: one to three
// rows at d 128, one or two at d 64): one K pass and one V pass over up to 4,096 keys, as every
// restart of a stream costs its ramp-up (Zen 5, one query over 3,584 keys, 8 kv heads, d 128:
// 0.77-0.80 of copy bandwidth against 0.67-0.72 at 1024 keys; fp32 did not gain).
constexpr int kStreamKeyBlock = 4096;

// Set row r's masked-out scores of the key block [k0, k0 + n) to -inf (transposed storage).
void mask_column(float* st, int n, int rows, int r, int k0, const RowSpans& sp) {
  // Visible pieces of the row clipped to the block, in increasing order (beacon_mask.h spans).
  const int lo[3] = {0, sp.mid_begin, sp.self_key};
  const int hi[3] = {sp.head_end, sp.mid_end, sp.self_key >= 0 ? sp.self_key + 1 : 0};
  int pos = 0;  // first key (block-relative) not yet decided
  for (int p = 0; p < 3; ++p) {
    const int a = std::min(std::max(lo[p] - k0, 0), n);
    const int b = std::min(std::max(hi[p] - k0, 0), n);
    if (b <= a) continue;
    for (int c = pos; c < a; ++c) st[static_cast<int64_t>(c) * rows + r] = kNegInf;
    pos = std::max(pos, b);
  }
  for (int c = pos; c < n; ++c) st[static_cast<int64_t>(c) * rows + r] = kNegInf;
}

struct Tile {
  int b;         // sequence
  int t0, t1;    // local query rows [t0, t1)
  int64_t cost;  // for scheduling
};

// The call's parameters (attn_params.h) and the query tiling.
struct Problem : beacon::HostAttnParams {
  int tokens_per_tile, rows_per_tile;
};

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Tiles with fewer rows than this use the dot-product kernels instead of GEMMs.
constexpr int kSmallRows = 8;

template <typename T>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::vector<SeqLens>& lens, const int32_t* cu, const Problem& P,
                      at::Tensor& out, at::Tensor& lse) {
  const int d = static_cast<int>(P.head_dim);
  const int G = static_cast<int>(P.group);
  const int64_t H = P.heads;

  std::vector<Tile> tiles;
  for (int b = 0; b < static_cast<int>(lens.size()); ++b) {
    const int nq = cu[b + 1] - cu[b];
    for (int t0 = 0; t0 < nq; t0 += P.tokens_per_tile) {
      const int t1 = std::min(nq, t0 + P.tokens_per_tile);
      // Cost estimate: rows x keys up to the last key any row sees.
      int kend = 0;
      for (int t = t0; t < t1; ++t)
        kend = std::max(kend, beacon::key_end(
                                  beacon::row_spans(lens[b], nq, t, P.mode, P.attend_previous)));
      tiles.push_back({b, t0, t1, static_cast<int64_t>(t1 - t0) * kend});
    }
  }
  // Longest first, handed out dynamically below: tiles differ in cost (causal rows, beacon
  // rows, sequences of different lengths) and the machine may be shared.
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const Tile& a, const Tile& b) { return a.cost > b.cost; });
  const int64_t n_work = static_cast<int64_t>(tiles.size()) * P.kv_heads;
  if (n_work == 0) return;
  int rows_max = 0;  // scratch is sized for the call's largest tile (a decode step's: G rows)
  for (const Tile& t : tiles) rows_max = std::max(rows_max, (t.t1 - t.t0) * G);

  // Per-thread fp32 scratch: Q tile and its transpose, transposed scores, accumulator, row
  // state, and the key and value blocks in fp32 (16-bit blocks widened; fp32 blocks copied too:
  // a hot, contiguous block measured about 7% faster than reading the cache in place).
  // Every piece starts on a 64-byte line (sizes rounded to 16 floats, the buffer aligned): AMX
  // tile loads and stores of rows that straddle two lines took ~3x as long here.
  const auto line = [](int64_t floats) { return static_cast<int64_t>(beacon_cpu::whole_lines<float>(floats)); };
  const int64_t q_elems = line(static_cast<int64_t>(rows_max) * d);
  const int small_rows_max = std::min(rows_max, kSmallRows - 1);  // rows of a decode tile, at most
  const int64_t s_elems = line(std::max({static_cast<int64_t>(rows_max) * kKeyBlock,
                                         static_cast<int64_t>(small_rows_max) * kDecodeKeyBlock,
                                         static_cast<int64_t>(std::min(small_rows_max, kPvStreamRowsMax)) * kStreamKeyBlock}));
  const int64_t r_elems = line(rows_max);
  // (decode_qk widens a 16-bit decode block into k_block for 5 or 7 rows; pages never touched
  // cost nothing)
  const int64_t kv_elems = line(static_cast<int64_t>(std::max(kKeyBlock, kDecodeKeyBlock)) * d);
  // bf16 with AVX-512-BF16: Q K^T and P V by bf16 dot products (bf16_gemm.h; P rounded to bf16,
  // as flash attention's GPU kernels do), on AMX tiles where the CPU has them.
  const bool bf16_dot = std::is_same_v<T, at::BFloat16> && beacon_cpu::use_bf16_dot();
  const bool bf16_pv = bf16_dot && beacon_cpu::use_bf16_pv();
  // P in bf16 [rows x keys padded to 32]: whole 16-pair tiles for the P V GEMM.
  const int64_t p_elems = bf16_pv ? line(static_cast<int64_t>(rows_max) * kKeyBlock / 2) : 0;
  // A decode tile's second scores (the next key block's, decode_pv_qk_amx), after the first.
  const int64_t s2_elems = line(static_cast<int64_t>(small_rows_max) * kDecodeKeyBlock);
  const int64_t per_thread = 3 * q_elems + s_elems + s2_elems + 5 * r_elems + 2 * kv_elems + p_elems;
  const int n_threads = at::get_num_threads();
  // Not zero-filled: every piece is written before it is read (a decode step's scratch was
  // filled at every call, more bytes than a short cache's K and V).
  const beacon_cpu::LineBuffer<float> scratch =
      beacon_cpu::line_buffer<float>(static_cast<size_t>(per_thread) * n_threads);
  float* const buffer = scratch.get();

  const T* q_data = q.const_data_ptr<T>();
  const T* k_data = k.const_data_ptr<T>();
  const T* v_data = v.const_data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  float* lse_data = lse.data_ptr<float>();

  // Tiny steps (a short decode) run on the calling thread: waking the pool costs more.
  int64_t total_macs = 0;
  for (const Tile& t : tiles) total_macs += t.cost * G * P.kv_heads * d;
  const int64_t n_parts = total_macs < (int64_t{1} << 20) ? 1 : n_threads;
  std::atomic<int64_t> next_work{0};
  at::parallel_for(0, n_parts, 1, [&](int64_t, int64_t) {
    float* q_tile = buffer + at::get_thread_num() * per_thread;
    float* q_t = q_tile + q_elems;
    float* acc = q_t + q_elems;
    float* scores = acc + q_elems;
    float* scores_next = scores + s_elems;
    float* row_max = scores_next + s2_elems;
    float* row_sum = row_max + r_elems;
    float* corr = row_sum + r_elems;
    float* tmp0 = corr + r_elems;
    float* tmp1 = tmp0 + r_elems;
    float* k_block = tmp1 + r_elems;
    float* v_block = k_block + kv_elems;
    uint16_t* p_bf16 = reinterpret_cast<uint16_t*>(v_block + kv_elems);
    uint32_t* v_pairs = reinterpret_cast<uint32_t*>(v_block);  // V in pairs (bf16_pv)
    std::vector<RowSpans> spans(P.tokens_per_tile);
    std::vector<BlockKind> kinds(P.tokens_per_tile);
    std::vector<int> skip_rows;
    skip_rows.reserve(rows_max);

    for (int64_t w = next_work.fetch_add(1); w < n_work; w = next_work.fetch_add(1)) {
      const Tile& tile = tiles[w / P.kv_heads];
      const int64_t kvh = w % P.kv_heads;
      const SeqLens& L = lens[tile.b];
      const int nq = cu[tile.b + 1] - cu[tile.b];
      const int n_tok = tile.t1 - tile.t0;
      const int rows = n_tok * G;
      const bool small = rows < kSmallRows;
      // bf16 decode with AVX-512-BF16: decode_avx512.h's kernels (q as bf16, acc in 32-split order).
      const bool dec_bf16 = small && std::is_same_v<T, at::BFloat16> && use_decode_bf16(rows, d);
      const bool dec_amx = dec_bf16 && use_decode_amx(rows, d);  // its Q K^T on AMX tiles
      // fp32 decode with AVX-512: decode_avx512.h's kernels (q, acc in order).
      const bool dec_f32 = small && std::is_same_v<T, float> && use_decode_f32(rows, d);
      // Else the AVX2 decode kernels, P V over an fp32 or bf16 cache streamed (decode_pv_stream;
      // q and acc in order).
      const bool dec_pv_stream = small && !dec_f32 && !dec_bf16 && !std::is_same_v<T, at::Half> &&
                                 use_decode_pv_stream(rows, d);
      // bf16 and streamed: its Q K^T by vdpbf16ps straight from the cache (decode_qk_bf16) where
      // the CPU has AVX-512-BF16, a quarter of the AVX2 kernel's instructions per key (Zen 5, one
      // query over 3,584 keys, 8 kv heads, d 128: 0.17 ms back to back against 0.20-0.23, 0.73-0.74
      // of copy bandwidth from memory against 0.68-0.70; 3 rows 0.22 ms against 0.40, 0.75-0.77
      // against 0.56-0.60; bench/decode_rows.py).
      const bool dec_qk_dot = dec_pv_stream && std::is_same_v<T, at::BFloat16> && use_decode_qk_bf16(rows, d);
      // Its P V interleaved with the next key block's Q K^T, whose scores wait in scores_next.
      const bool dec_pv_qk = dec_amx && use_decode_pv_qk(rows, d);
      // Else (no AMX) its P V by bf16 dot products, acc in the pairs' order (decode_pv_pairs).
      const bool dec_pv_pairs = dec_bf16 && !dec_pv_qk && use_decode_pv_pairs(rows, d);
      const int key_block = !small ? kKeyBlock : dec_qk_dot ? kStreamKeyBlock : kDecodeKeyBlock;
      bool next_scored = false;
      const bool split = small && !dec_bf16 && !dec_f32 && !dec_pv_stream && decode_split<T>(rows, d);  // q, acc in split order
      const int64_t row0 = cu[tile.b] + tile.t0;  // packed index of the tile's first query

      // Gather the tile's queries in fp32: row r = (token r / G, head kvh * G + r % G).
      int key_end = 0;
      for (int t = 0; t < n_tok; ++t) {
        spans[t] = beacon::row_spans(L, nq, tile.t0 + t, P.mode, P.attend_previous);
        key_end = std::max(key_end, beacon::key_end(spans[t]));
        if (!dec_bf16 && !dec_qk_dot && (small || !bf16_dot))  // the bf16 paths read the queries' bf16 rows (below)
          to_float(q_data + (row0 + t) * P.q_row_stride + kvh * G * P.q_head_stride, P.q_head_stride, G,
                   d, q_tile + static_cast<int64_t>(t) * G * d);
      }
      if (split) split_columns(q_tile, rows, d);
      uint16_t* q_bf16 = reinterpret_cast<uint16_t*>(q_t);  // dec_bf16: the queries' own bits
      if (dec_bf16 || dec_qk_dot)
        for (int r = 0; r < rows; ++r)
          std::memcpy(q_bf16 + static_cast<int64_t>(r) * d,
                      q_data + (row0 + r / G) * P.q_row_stride + (kvh * G + r % G) * P.q_head_stride,
                      sizeof(uint16_t) * d);
      // dec_amx: Q^T in pairs too (B of the tile product), in q_tile (unused by that path).
      uint32_t* q_pairs_dec = reinterpret_cast<uint32_t*>(q_tile);
      if (dec_amx)
        beacon_cpu::pack_rows_pairs_transposed([&](int r) { return q_bf16 + static_cast<int64_t>(r) * d; }, rows,
                                               d, q_pairs_dec, rows);
      // The QK^T GEMM reads Q^T [d x rows]: fp32, or bf16 pairs for the bf16 dot products.
      uint32_t* q_pairs = reinterpret_cast<uint32_t*>(q_t);
      if (!small && bf16_dot) {
        const auto q_row = [&](int r) {
          return reinterpret_cast<const uint16_t*>(q_data + (row0 + r / G) * P.q_row_stride +
                                                   (kvh * G + r % G) * P.q_head_stride);
        };
        beacon_cpu::pack_rows_pairs_transposed(q_row, rows, d, q_pairs, rows);
      } else if (!small) {
        for (int r = 0; r < rows; ++r)
          for (int i = 0; i < d; ++i) q_t[static_cast<int64_t>(i) * rows + r] = q_tile[r * d + i];
      }
      for (int r = 0; r < rows; ++r) {
        row_max[r] = kNegInf;
        row_sum[r] = 0.0f;
      }
      if (small) std::fill(acc, acc + static_cast<int64_t>(rows) * d, 0.0f);
      const T* k_seq = k_data + tile.b * P.k_batch_stride + kvh * P.k_head_stride;
      const T* v_seq = v_data + tile.b * P.v_batch_stride + kvh * P.v_head_stride;

      // fp32 K / V rows that lie back to back are the GEMMs' operands as they are (the copy cost
      // 4.6% of an fp32 prefill step, perf); rows of a strided view are still copied per block.
      const bool k_in_place = std::is_same_v<T, float> && P.k_row_stride == d;
      const bool v_in_place = std::is_same_v<T, float> && P.v_row_stride == d;
      // The block's kind for the tile (each token's in kinds when given).
      const auto block_kind = [&](int k0, int k1, BlockKind* per_token) {
        BlockKind kind = BlockKind::kSkip;
        for (int t = 0; t < n_tok; ++t) {
          const BlockKind kt = beacon::classify_block(spans[t], k0, k1);
          if (per_token != nullptr) per_token[t] = kt;
          kind = t == 0 ? kt : beacon::combine_kinds(kind, kt);
        }
        return kind;
      };
      bool first = true;
      for (int k0 = 0; k0 < key_end; k0 += key_block) {
        const int k1 = std::min(k0 + key_block, key_end);
        const int n = k1 - k0;
        const BlockKind kind = block_kind(k0, k1, kinds.data());
        if (kind == BlockKind::kSkip) continue;

        // scores^T [n x rows] = scale * K_block Q^T.
        const T* kb = k_seq + k0 * P.k_row_stride;
        const T* vb = v_seq + k0 * P.v_row_stride;
        const int n_pad = round_up(n, 32);  // P's keys for bf16_pv: whole 16-pair tiles
        if (next_scored) {  // by the previous block's decode_pv_qk_amx
          std::swap(scores, scores_next);
        } else if (dec_amx) {
          decode_qk_amx(q_pairs_dec, q_bf16, rows, d, reinterpret_cast<const uint16_t*>(kb), P.k_row_stride,
                        n, P.scale, scores);
        } else if (dec_bf16 || dec_qk_dot) {
          decode_qk_bf16(q_bf16, rows, d, reinterpret_cast<const uint16_t*>(kb), P.k_row_stride, n,
                         P.scale, scores);
        } else if (dec_f32) {
          decode_qk_f32(q_tile, rows, d, reinterpret_cast<const float*>(kb), P.k_row_stride, n, P.scale, scores);
        } else if (small) {
          decode_qk(q_tile, rows, d, kb, P.k_row_stride, n, P.scale, scores, k_block, split);
        } else {
          if (bf16_pv)
            beacon_cpu::pack_pair_rows(reinterpret_cast<const uint16_t*>(vb), P.v_row_stride, n, d, n_pad,
                                       v_pairs);
          else if (!v_in_place)
            to_float(vb, P.v_row_stride, n, d, v_block);
          if (bf16_dot) {  // K straight from the cache, in pairs
            // Unscaled where the softmax takes the scale (softmax_to_bf16.h): tiles stored as is.
            beacon_cpu::gemm_bf16_pairs(n, rows, d / 2, bf16_pv ? 1.0f : P.scale,
                                        reinterpret_cast<const uint16_t*>(kb), P.k_row_stride, q_pairs,
                                        rows, false, scores, rows);
          } else {
            if (!k_in_place) to_float(kb, P.k_row_stride, n, d, k_block);
            const float* k_f32 = k_in_place ? reinterpret_cast<const float*>(kb) : k_block;
            beacon_cpu::block_gemm(n, rows, d, P.scale, k_f32, d, 1, q_t, rows, false, scores, rows);
          }
        }
        if (kind == BlockKind::kPartial) {
          skip_rows.clear();
          for (int t = 0; t < n_tok; ++t) {
            if (kinds[t] == BlockKind::kFull) continue;
            for (int g = 0; g < G; ++g) {
              const int r = t * G + g;
              if (kinds[t] == BlockKind::kSkip) skip_rows.push_back(r);
              else mask_column(scores, n, rows, r, k0, spans[t]);
            }
          }
          // Rows that see none of the block, key by key: neighbouring rows share cache lines in
          // the transposed scores (row by row, every store touched another line).
          if (!skip_rows.empty())
            for (int c = 0; c < n; ++c) {
              float* col = scores + static_cast<int64_t>(c) * rows;
              for (const int r : skip_rows) col[r] = kNegInf;
            }
        }
        // GEMM tiles: the next block's K and V into L2 during the exp pass (block_prefetch.h).
        beacon_cpu::BlockPrefetch next_block;
        if (!small && k1 < key_end) {
          const int n_next = std::min(key_block, key_end - k1);
          next_block.add(kb + key_block * P.k_row_stride, n_next, d * sizeof(T), P.k_row_stride * sizeof(T));
          next_block.add(vb + key_block * P.v_row_stride, n_next, d * sizeof(T), P.v_row_stride * sizeof(T));
        }
        bool rescale = true;  // false: the running maxima stayed (lazy update), corr all 1
        if (bf16_pv && !small)
          rescale = beacon_cpu::softmax_to_bf16_rows(scores, n, rows, P.scale, row_max, row_sum, corr, tmp0,
                                                     tmp1, n_pad, p_bf16, &next_block);
        else
          rescale = softmax_update(scores, n, rows, row_max, row_sum, corr, tmp0, tmp1,
                                   small ? nullptr : &next_block);
        if (!first && rescale) scale_rows(acc, rows, d, corr);
        // acc [rows x d] (+)= P V, P(r, c) = scores[c * rows + r].
        const int n_next = std::min(key_block, key_end - k1);
        next_scored = dec_pv_qk && n_next > 0 && block_kind(k1, k1 + n_next, nullptr) != BlockKind::kSkip;
        if (next_scored) {
          decode_pv_qk_amx(scores, rows, n, reinterpret_cast<const uint16_t*>(vb), P.v_row_stride, d, acc,
                           q_pairs_dec, q_bf16, reinterpret_cast<const uint16_t*>(kb + key_block * P.k_row_stride),
                           P.k_row_stride, n_next, P.scale, scores_next);
        } else if (dec_pv_pairs) {  // P's pairs in v_block (unused by the decode kernels)
          decode_pv_pairs(scores, rows, n, reinterpret_cast<const uint16_t*>(vb), P.v_row_stride, d, acc,
                          v_pairs);
        } else if (dec_bf16) {
          decode_pv_bf16(scores, rows, n, reinterpret_cast<const uint16_t*>(vb), P.v_row_stride, d, acc);
        } else if (dec_f32) {
          decode_pv_f32(scores, rows, n, reinterpret_cast<const float*>(vb), P.v_row_stride, d, acc);
        } else if (dec_pv_stream) {
          if constexpr (!std::is_same_v<T, at::Half>) decode_pv_stream(scores, rows, n, vb, P.v_row_stride, d, acc);
        } else if (small) {
          decode_pv(scores, rows, n, vb, P.v_row_stride, d, acc, split);
        } else if (bf16_pv) {
          beacon_cpu::gemm_bf16_pairs(rows, d, n_pad / 2, 1.0f, p_bf16, n_pad, v_pairs, d, !first, acc, d);
        } else {
          const float* v_f32 = v_in_place ? reinterpret_cast<const float*>(vb) : v_block;
          beacon_cpu::block_gemm(rows, d, n, 1.0f, scores, 1, rows, v_f32, d, !first, acc, d);
        }
        first = false;
      }

      if (scores > scores_next) std::swap(scores, scores_next);  // scores_next may be the shorter
      if (split && !first) merge_columns(acc, rows, d);
      if (dec_pv_pairs && !first) unpair_columns(acc, rows, d);
      else if (dec_bf16 && !first) merge_columns(acc, rows, d, 32);
      // Normalise and write out; a row that saw no key gets out = 0 and lse = +inf.
      for (int r = 0; r < rows; ++r) {
        const int t = r / G, g = r % G;
        const int64_t head = kvh * G + g;
        T* o = out_data + ((row0 + t) * H + head) * d;
        float* lse_out = lse_data + (row0 + t) * H + head;
        if (first || row_sum[r] == 0.0f) {
          std::fill(o, o + d, T(0));
          *lse_out = std::numeric_limits<float>::infinity();
          continue;
        }
        const float inv = 1.0f / row_sum[r];
        const float* a = acc + static_cast<int64_t>(r) * d;
        for (int c = 0; c < d; ++c) o[c] = static_cast<T>(a[c] * inv);
        *lse_out = row_max[r] + std::log(row_sum[r]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache,
                                                 const at::Tensor& cu_seqlens_q,
                                                 const at::Tensor& mem_len, const at::Tensor& raw_len,
                                                 const at::Tensor& beacon_len,
                                                 const at::Tensor& ratio, int64_t max_seqlen_q,
                                                 c10::string_view mode_str, bool attend_previous,
                                                 double softmax_scale) {
  const Mode mode = beacon::checks::check_attention(kOp, q, k_cache, v_cache, cu_seqlens_q, mem_len, raw_len,
                                                    beacon_len, ratio, max_seqlen_q, mode_str, softmax_scale);
  const int64_t d = q.size(2);
  // The CPU kernel's head_dim rule (the CUDA kernels have their own).
  TORCH_CHECK_VALUE(d > 0 && d % 8 == 0 && d <= 256, kOp,
                    ": q head_dim must be a multiple of 8 in [8, 256], got ", d);
  const std::vector<SeqLens> lens = beacon::cpu::read_step_lengths(
      cu_seqlens_q, mem_len, raw_len, beacon_len, ratio, q.size(0), max_seqlen_q, k_cache.size(2));
  const int32_t* cu = cu_seqlens_q.const_data_ptr<int32_t>();

  Problem P;
  static_cast<beacon::HostAttnParams&>(P) =
      beacon::fill_attn_params(q, k_cache, v_cache, max_seqlen_q, mode, attend_previous, softmax_scale);
  at::Tensor out = at::empty({P.total_q, P.heads, d}, q.options());
  at::Tensor lse = at::empty({P.total_q, P.heads}, q.options().dtype(at::kFloat));
  if (P.heads == 0) return {out, lse};  // nothing to compute (and no GQA group to tile by)
  P.tokens_per_tile = static_cast<int>(std::max<int64_t>(1, kQueryTileRows / P.group));
  P.rows_per_tile = static_cast<int>(P.tokens_per_tile * P.group);
  switch (q.scalar_type()) {
    case at::kFloat: attention_kernel<float>(q, k_cache, v_cache, lens, cu, P, out, lse); break;
    case at::kBFloat16:
      attention_kernel<at::BFloat16>(q, k_cache, v_cache, lens, cu, P, out, lse);
      break;
    default: attention_kernel<at::Half>(q, k_cache, v_cache, lens, cu, P, out, lse); break;
  }
  return {out, lse};
}

}  // namespace

namespace beacon_cpu {
// For build_info() (bindings.cpp), which does not include ATen.
const char* fp32_gemm_path() { return gemm_path_name(); }
}  // namespace beacon_cpu

TORCH_LIBRARY_IMPL(beacon, CPU, m) { m.impl("attention", &attention_cpu); }
