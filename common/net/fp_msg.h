/* fp_msg.h — protocol envelopes (proto/fedpeft.proto) to and from frames.
 *
 * Decoding tolerates unknown fields (a newer peer's additions); an envelope whose body is not
 * one this version knows decodes with body_case NOT_SET, which the receiver answers with
 * Error UNKNOWN_TYPE. Sizes inside messages are bounded by fp_msg_check before use. */
#ifndef FP_MSG_H
#define FP_MSG_H

#include <stddef.h>
#include <stdint.h>

#include "fedpeft.pb-c.h"
#include "fp_error.h"
#include "fp_tensor_list.h"

#define FP_PROTOCOL_VERSION 1
#define FP_MAX_NAME 256          /* site names, module names, reasons */
#define FP_MAX_TENSORS 65536     /* tensors listed in one Task or Update */
#define FP_MAX_CHUNK (1u << 20)  /* bytes of data in one TensorChunk */
#define FP_SA_MAX_SITES 4096     /* participants of a secure round */
#define FP_SA_MAX_CERT 16384     /* bytes of a relayed certificate (DER) */
#define FP_SA_MAX_SIG 1024       /* bytes of a key signature */
#define FP_SA_SEALED_BYTES 160   /* a sealed pair of shares (fp_secagg.h FP_SA_SEALED) */
#define FP_SA_SHARE_BYTES 72     /* one share on the wire */

typedef Fedpeft__Envelope fp_env_t;

/* A frame ([u32 length][envelope]) of env in a malloc'd buffer. version is set here. */
int fp_msg_frame(fp_env_t *env, unsigned char **out, size_t *len, fp_err_t *err);

/* Frames env and hands the frame to send(ctx, frame, len) — a connection's or a session's
 * send — then frees it: 0, or the framing's or send's error. *len (optional): the frame's
 * bytes. The one way every daemon puts a message on the wire. */
typedef int (*fp_msg_send_fn)(void *ctx, const unsigned char *frame, size_t len);
int fp_msg_send(fp_env_t *env, fp_msg_send_fn send, void *ctx, size_t *len);

/* Decodes one frame payload; NULL (with err) for malformed protobuf. */
fp_env_t *fp_msg_decode(const unsigned char *p, size_t n, fp_err_t *err);
void fp_msg_free(fp_env_t *e);

/* "Hello", "TensorChunk", ... or "unknown" */
const char *fp_msg_name(const fp_env_t *e);

/* An Error frame with code and reason. */
int fp_msg_error_frame(Fedpeft__Error__Code code, const char *reason, unsigned char **out,
                       size_t *len, fp_err_t *err);

/* TensorInfo messages for t[0..n), in one allocation that *out points to (free it); the
 * names are borrowed from t. */
int fp_msg_tensors_pack(const fp_stream_tensor_t *t, int n, Fedpeft__TensorInfo ***out);
/* The list that TensorInfo messages describe, in one allocation (free it); the names are
 * borrowed from the messages. */
int fp_msg_tensors_unpack(Fedpeft__TensorInfo *const *ti, size_t n, fp_stream_tensor_t **out);

/* Bounds every length and count inside e (names, hashes, shapes, tensor lists, chunk sizes,
 * hyper-parameters) and the protocol version. 0, or an Error code with reason filled. */
Fedpeft__Error__Code fp_msg_check(const fp_env_t *e, char *reason, size_t n);

/* Which messages may arrive in which state of a session, for each side. */
typedef enum fp_role { FP_ROLE_SERVER, FP_ROLE_CLIENT } fp_role_t;
typedef enum fp_pstate {
    FP_PS_GREETING,  /* server: waiting for Hello; client: waiting for Welcome */
    FP_PS_READY,     /* between streams */
    FP_PS_STREAMING, /* receiving a tensor stream (server: an Update; client: a Task) */
    FP_PS_DONE       /* Bye or Error received: nothing more */
} fp_pstate_t;

/* For a message e (already fp_msg_check'ed) received by `me` in state st: 0 and *next, or
 * Error OUT_OF_ORDER with a reason naming the message and the state. */
Fedpeft__Error__Code fp_msg_order(fp_role_t me, fp_pstate_t st, const fp_env_t *e,
                                  fp_pstate_t *next, char *reason, size_t n);

#endif
