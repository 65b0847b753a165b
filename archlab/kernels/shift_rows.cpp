// archlab's per-row shift of KV-cache storage (archlab/kernels/__init__.py describes it): for every tensor t of
// stored (a layer's keys or values, t [B, G, C, D], C >= length) and every batch row b with e = shifts[b] > 0,
//   t[b, g, e .. length - 1] = t[b, g, 0 .. length - 1 - e] (as they were),   t[b, g, 0 .. e - 1] = 0,
// for each head g: row b's first length - e positions move e places on, zeros before them. A batch whose rows
// accepted different numbers of speculative drafts lines its rows up again so (archlab.nn.attention.rewind_rows);
// the values are moved, not computed, so every kept key and value keeps its bits. One call for all the layers'
// tensors, where the same moves as PyTorch slices took about 10 us of dispatch each (540 for SmolLM2's 30 layers
// and 3 moved rows: 5 ms a step). Each (b, g) slab's positions are contiguous (t.stride(2) == D, t.stride(3) == 1:
// a KV cache's storage, or its view after drop_front), so a move is one memmove.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

void shift_rows(at::TensorList stored, at::IntArrayRef shifts, int64_t length) {
  const int64_t B = static_cast<int64_t>(shifts.size());
  TORCH_CHECK(length >= 0, "length = ", length, " must be >= 0");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(shifts[b] >= 0 && shifts[b] <= length, "shifts[", b, "] = ", shifts[b], " is outside 0..", length);
  struct Slab {
    char* base;  // position 0 of one (b, g) slab
    int64_t row_bytes, shift;
  };
  std::vector<Slab> slabs;
  for (size_t n = 0; n < stored.size(); ++n) {
    const at::Tensor& t = stored[n];
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.device().is_cpu(), "stored[", n, "] must be a CPU tensor [B = ", B,
                ", G, C, D], got ", t.sizes());
    TORCH_CHECK(t.size(2) >= length, "stored[", n, "] holds ", t.size(2), " positions, fewer than length = ", length);
    TORCH_CHECK(t.stride(3) == 1 && (t.size(2) <= 1 || t.stride(2) == t.size(3)),
                "stored[", n, "]'s positions must be contiguous in each (row, head) slab, got strides ", t.strides());
    const int64_t row_bytes = t.size(3) * static_cast<int64_t>(t.element_size());
    char* data = static_cast<char*>(t.data_ptr());
    for (int64_t b = 0; b < B; ++b)
      if (shifts[b] > 0)
        for (int64_t g = 0; g < t.size(1); ++g)
          slabs.push_back({data + (b * t.stride(0) + g * t.stride(1)) * t.element_size(), row_bytes, shifts[b]});
  }
  at::parallel_for(0, static_cast<int64_t>(slabs.size()), 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const Slab& slab = slabs[s];
      std::memmove(slab.base + slab.shift * slab.row_bytes, slab.base, (length - slab.shift) * slab.row_bytes);
      std::memset(slab.base, 0, slab.shift * slab.row_bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(archlab_kernels, m) {
  m.def("shift_rows(Tensor(a!)[] stored, int[] shifts, int length) -> ()");
}

TORCH_LIBRARY_IMPL(archlab_kernels, CPU, m) { m.impl("shift_rows", shift_rows); }
