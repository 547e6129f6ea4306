/* fp_tensor_list.h — the tensors of a stream: what the protocol's TensorInfo list says,
 * without the protobuf types (peft/ builds and reads streams; common/fp_msg converts). */
#ifndef FP_TENSOR_LIST_H
#define FP_TENSOR_LIST_H

#include <stdint.h>

typedef struct fp_stream_tensor {
    const char *name;   /* base_model.model.<module>.lora_{A,B}.weight */
    uint64_t rows, cols;
    uint64_t offset, nbytes;
} fp_stream_tensor_t;

#endif
