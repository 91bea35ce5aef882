// Deterministic counting sort of the (token, slot) assignments by expert (reference.route).
//
// Priority order is slot j first, then token t. Tokens are cut into chunks; the position of
// assignment (t, j) within expert e is
//   #(assignments to e in slots < j) + #(slot j, earlier chunks) + #(slot j, this chunk, tokens < t),
// so one counting pass per chunk and an exclusive scan over (slot, chunk) give every chunk its
// starting positions, and a second pass assigns rows independently per chunk.
#include <algorithm>
#include <vector>

#include "common/parallel.h"
#include "cpu/moe/moe.h"

namespace pyfast::cpu {

std::int64_t moe_route(const std::int32_t* choices, std::int64_t tokens, int k, std::int64_t experts,
                       std::int64_t capacity, std::int64_t align, std::int64_t rows, std::int64_t* counts,
                       std::int64_t* offsets, std::int64_t* row_of_assignment, std::int64_t* assignment_of_row) {
  const std::int64_t chunk = std::max<std::int64_t>(4096, (tokens + max_threads() - 1) / std::max(max_threads(), 1));
  const std::int64_t chunks = std::max<std::int64_t>((tokens + chunk - 1) / chunk, 1);
  // start[(j * chunks + c) * experts + e]: per-(slot, chunk) counts, then their exclusive scan.
  std::vector<std::int64_t> start(static_cast<std::size_t>(k * chunks * experts), 0);
  std::vector<std::int64_t> bad(static_cast<std::size_t>(chunks), 0);

  parallel_chunks(tokens, chunk, [&](std::int64_t c, std::int64_t begin, std::int64_t end) {
    for (std::int64_t t = begin; t < end; ++t) {
      for (int j = 0; j < k; ++j) {
        const std::int64_t e = choices[t * k + j];
        if (e < 0 || e >= experts) {
          ++bad[c];
          continue;
        }
        ++start[(j * chunks + c) * experts + e];
      }
    }
  });

  std::vector<std::int64_t> running(static_cast<std::size_t>(experts), 0);
  for (std::int64_t slot_chunk = 0; slot_chunk < k * chunks; ++slot_chunk) {
    std::int64_t* s = start.data() + slot_chunk * experts;
    for (std::int64_t e = 0; e < experts; ++e) {
      const std::int64_t n = s[e];
      s[e] = running[e];
      running[e] += n;
    }
  }
  offsets[0] = 0;
  for (std::int64_t e = 0; e < experts; ++e) {
    counts[e] = capacity > 0 ? std::min(running[e], capacity) : running[e];
    const std::int64_t segment = align > 1 ? (counts[e] + align - 1) / align * align : counts[e];
    offsets[e + 1] = offsets[e] + segment;
  }
  // Padding after each expert's kept rows, and unused rows at the end, hold -1.
  for (std::int64_t e = 0; e < experts; ++e) {
    std::fill(assignment_of_row + offsets[e] + counts[e], assignment_of_row + offsets[e + 1], std::int64_t{-1});
  }
  std::fill(assignment_of_row + std::min(offsets[experts], rows), assignment_of_row + rows, std::int64_t{-1});

  parallel_chunks(tokens, chunk, [&](std::int64_t c, std::int64_t begin, std::int64_t end) {
    std::vector<std::int64_t> position(static_cast<std::size_t>(k * experts));
    for (int j = 0; j < k; ++j) {
      std::copy_n(start.data() + (j * chunks + c) * experts, experts, position.data() + j * experts);
    }
    for (std::int64_t t = begin; t < end; ++t) {
      for (int j = 0; j < k; ++j) {
        const std::int64_t a = t * k + j;
        const std::int64_t e = choices[a];
        std::int64_t row = -1;
        if (e >= 0 && e < experts) {
          const std::int64_t pos = position[j * experts + e]++;
          if (capacity <= 0 || pos < capacity) row = offsets[e] + pos;
        }
        row_of_assignment[a] = row;
        if (row >= 0) assignment_of_row[row] = a;
      }
    }
  });
  std::int64_t total_bad = 0;
  for (std::int64_t b : bad) total_bad += b;
  return total_bad;
}

}  // namespace pyfast::cpu
