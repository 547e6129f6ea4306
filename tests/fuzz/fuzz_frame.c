/* libFuzzer target: the frame decoder fed in arbitrary pieces, and every frame it yields
 * decoded and bounds-checked as an envelope. Any input must end in frames, a clean refusal or
 * a pending partial frame — never a crash, leak or overread. */
#include <stddef.h>
#include <stdint.h>

#include "fp_frame.h"
#include "fp_msg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int on_frame(void *ctx, const unsigned char *p, size_t n)
{
    (void)ctx;
    fp_env_t *e = fp_msg_decode(p, n, NULL);
    if (e) {
        char reason[FP_MAX_NAME];
        fp_pstate_t next;
        if (fp_msg_check(e, reason, sizeof reason) == 0)
            fp_msg_order(FP_ROLE_SERVER, FP_PS_READY, e, &next, reason, sizeof reason);
        fp_msg_free(e);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    /* the first byte picks the piece size, so that frames straddle feeds in every way */
    size_t piece = (size_t)data[0] % 17 + 1;
    fp_frame_dec_t d;
    fp_frame_dec_init(&d, 1u << 16);
    for (size_t i = 1; i < size; i += piece) {
        size_t n = size - i < piece ? size - i : piece;
        if (fp_frame_feed(&d, data + i, n, on_frame, NULL, NULL) != 0)
            break;
    }
    (void)fp_frame_pending(&d);
    fp_frame_dec_free(&d);
    return 0;
}
