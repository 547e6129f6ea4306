/* libFuzzer target for the safetensors reader: any bytes must give either a valid file whose
 * every float tensor converts, or a clean error — never a crash, leak or overread. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "fp_safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fp_st_file_t *f = NULL;
    fp_err_t err;
    if (fp_st_open_mem(&f, data, size, "fuzz", &err) != 0)
        return 0;
    for (size_t i = 0; i < fp_st_count(f); i++) {
        const fp_st_tensor_t *t = fp_st_get(f, i);
        if (!fp_dtype_is_float(t->dtype) || t->nelem == 0)
            continue;
        /* nelem is bounded by the input size, which the reader checked */
        float *dst = malloc((size_t)t->nelem * sizeof(float));
        if (dst) {
            fp_st_read_f32(f, t, dst, &err);
            free(dst);
        }
        (void)fp_st_find(f, t->name);
    }
    (void)fp_st_meta(f, "format");
    fp_st_close(f);
    return 0;
}
