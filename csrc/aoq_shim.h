/* The few functions of libtorch's C shim (torch/csrc/inductor/aoti_torch/c/
 * shim.h) this extension calls, re-declared in plain C: PyTorch's header is
 * C++ (aliases, c10 includes).  shim_check.cpp includes both this file and
 * PyTorch's header, so a signature that drifts breaks the build. */
#ifndef AOQ_SHIM_H
#define AOQ_SHIM_H
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifndef AOQ_SHIM_SKIP_TYPEDEFS
typedef struct AtenTensorOpaque *AtenTensorHandle;
typedef struct TorchLibraryOpaque *TorchLibraryHandle;
typedef int32_t AOTITorchError;
typedef uint64_t StableIValue;
#endif

int32_t aoti_torch_device_type_cpu(void);
int32_t aoti_torch_device_type_cuda(void);
int32_t aoti_torch_dtype_bfloat16(void);
int32_t aoti_torch_dtype_float16(void);
int32_t aoti_torch_dtype_float32(void);
int32_t aoti_torch_dtype_uint8(void);
int32_t aoti_torch_dtype_int32(void);

AOTITorchError aoti_torch_delete_tensor_object(AtenTensorHandle tensor);
AOTITorchError aoti_torch_get_data_ptr(AtenTensorHandle tensor, void **ret_data_ptr);
AOTITorchError aoti_torch_get_dim(AtenTensorHandle tensor, int64_t *ret_dim);
AOTITorchError aoti_torch_get_numel(AtenTensorHandle tensor, int64_t *ret_numel);
AOTITorchError aoti_torch_get_sizes(AtenTensorHandle tensor, int64_t **ret_sizes);
AOTITorchError aoti_torch_get_dtype(AtenTensorHandle tensor, int32_t *ret_dtype);
AOTITorchError aoti_torch_get_device_type(AtenTensorHandle tensor, int32_t *ret_device_type);
AOTITorchError aoti_torch_get_device_index(AtenTensorHandle tensor, int32_t *ret_device_index);
AOTITorchError aoti_torch_is_contiguous(AtenTensorHandle tensor, bool *ret_is_contiguous);
AOTITorchError aoti_torch_empty_strided(int64_t ndim, const int64_t *sizes_ptr,
                                        const int64_t *strides_ptr, int32_t dtype,
                                        int32_t device_type, int32_t device_index,
                                        AtenTensorHandle *ret_new_tensor);

AOTITorchError aoti_torch_library_init_fragment(const char *ns, const char *file, uint32_t line,
                                                TorchLibraryHandle *ret_new_torch_lib);
AOTITorchError aoti_torch_library_init_impl(const char *ns, const char *k, const char *file,
                                            uint32_t line, TorchLibraryHandle *ret_new_torch_lib);
AOTITorchError aoti_torch_library_def(TorchLibraryHandle self, const char *schema);
AOTITorchError aoti_torch_library_impl(TorchLibraryHandle self, const char *name,
                                       void (*fn)(StableIValue *, uint64_t, uint64_t));

void aoti_torch_check(bool cond, const char *func, const char *file, uint32_t line,
                      const char *msg);

#ifdef AOQ_WITH_CUDA
AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index, void **ret_stream);
#endif

#ifdef __cplusplus
}
#endif
#endif
