// The project's only C++ file.  It holds no code that runs: it includes
// PyTorch's own C-shim header next to csrc/aoq_shim.h (our plain-C
// re-declarations) so that any drift in a signature we rely on is a compile
// error against the installed torch, and checks the argument conventions.
#if __cplusplus < 201703L
#error "ao_awq_export: torch's headers need C++17 (setup.py passes -std=c++17)"
#endif
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <type_traits>

#define AOQ_SHIM_SKIP_TYPEDEFS
#include "aoq_shim.h"

static_assert(std::is_same<StableIValue, uint64_t>::value, "StableIValue must be uint64_t");
static_assert(std::is_same<AOTITorchError, int32_t>::value, "AOTITorchError must be int32_t");
static_assert(sizeof(AtenTensorHandle) == sizeof(StableIValue), "tensor handle fits a stack slot");

// Taking each address with the exact type we declared: a mismatch between the
// two declarations above is already an error ("conflicting declaration").
using boxed_fn = void (*)(StableIValue *, uint64_t, uint64_t);
[[maybe_unused]] static AOTITorchError (*const check_impl)(TorchLibraryHandle, const char *,
                                                           boxed_fn) = &aoti_torch_library_impl;
[[maybe_unused]] static AOTITorchError (*const check_def)(TorchLibraryHandle, const char *) =
    &aoti_torch_library_def;
