#include "fp_msg.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp_escape.h"
#include "fp_frame.h"

int fp_msg_frame(fp_env_t *env, unsigned char **out, size_t *len, fp_err_t *err)
{
    *out = NULL;
    *len = 0;
    env->version = FP_PROTOCOL_VERSION;
    size_t n = fedpeft__envelope__get_packed_size(env);
    if (n > UINT32_MAX)
        return fp_err_set(err, -EFBIG, "message of %zu bytes cannot be framed", n);
    unsigned char *b = malloc(FP_FRAME_HEADER + n);
    if (!b)
        return fp_err_set(err, -ENOMEM, "out of memory for a %zu-byte message", n);
    fp_frame_header(b, n);
    fedpeft__envelope__pack(env, b + FP_FRAME_HEADER);
    *out = b;
    *len = FP_FRAME_HEADER + n;
    return 0;
}

int fp_msg_send(fp_env_t *env, fp_msg_send_fn send, void *ctx, size_t *len)
{
    unsigned char *f;
    size_t n;
    int rc = fp_msg_frame(env, &f, &n, NULL);
    if (rc == 0) {
        rc = send(ctx, f, n);
        free(f);
    }
    if (len)
        *len = rc == 0 ? n : 0;
    return rc;
}

static int varint(const unsigned char *p, size_t n, size_t *i, uint64_t *v)
{
    *v = 0;
    for (int shift = 0; shift < 64 && *i < n; shift += 7) {
        unsigned char b = p[(*i)++];
        *v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            return 1;
    }
    return 0;
}

/* Every string field of the message d encoded in p[0..n), at any depth, must be UTF-8 without
 * NUL: protobuf's `string` is UTF-8, and C strings would silently end at a NUL ("beta\0evil"
 * read as "beta"). protobuf-c checks neither, so the wire bytes are walked with the
 * descriptors. 0, or -1 with why naming the field. */
static int strings_ok(const ProtobufCMessageDescriptor *d, const unsigned char *p, size_t n,
                      int depth, char *why, size_t wn)
{
    size_t i = 0;
    while (i < n) {
        uint64_t key, v;
        if (!varint(p, n, &i, &key))
            return -1;
        unsigned wt = (unsigned)(key & 7);
        if (wt == 0) {
            if (!varint(p, n, &i, &v))
                return -1;
        } else if (wt == 1 || wt == 5) {
            size_t w = wt == 1 ? 8 : 4;
            if (n - i < w)
                return -1;
            i += w;
        } else if (wt == 2) {
            if (!varint(p, n, &i, &v) || v > n - i)
                return -1;
            const ProtobufCFieldDescriptor *f =
                key >> 3 <= UINT32_MAX ? protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3))
                                       : NULL;
            if (f && f->type == PROTOBUF_C_TYPE_STRING &&
                !fp_utf8_ok((const char *)p + i, (size_t)v, 1)) {
                snprintf(why, wn, "%s.%s is not UTF-8 text (or holds a NUL byte)",
                         d->short_name, f->name);
                return -1;
            }
            if (f && f->type == PROTOBUF_C_TYPE_MESSAGE && depth < 8 &&
                strings_ok(f->descriptor, p + i, (size_t)v, depth + 1, why, wn) != 0)
                return -1;
            i += (size_t)v;
        } else {
            return -1; /* groups: not in this protocol */
        }
    }
    return 0;
}

fp_env_t *fp_msg_decode(const unsigned char *p, size_t n, fp_err_t *err)
{
    fp_env_t *e = fedpeft__envelope__unpack(NULL, n, p);
    char why[160] = "";
    if (!e) {
        fp_err_set(err, -EBADMSG, "malformed message (%zu bytes do not decode as an envelope)",
                   n);
    } else if (strings_ok(&fedpeft__envelope__descriptor, p, n, 0, why, sizeof why) != 0) {
        fp_err_set(err, -EBADMSG, "malformed message: %s", why[0] ? why : "bad encoding");
        fp_msg_free(e);
        e = NULL;
    }
    return e;
}

void fp_msg_free(fp_env_t *e)
{
    if (e)
        fedpeft__envelope__free_unpacked(e, NULL);
}

const char *fp_msg_name(const fp_env_t *e)
{
    switch (e->body_case) {
    case FEDPEFT__ENVELOPE__BODY_HELLO: return "Hello";
    case FEDPEFT__ENVELOPE__BODY_WELCOME: return "Welcome";
    case FEDPEFT__ENVELOPE__BODY_TASK: return "Task";
    case FEDPEFT__ENVELOPE__BODY_CHUNK: return "TensorChunk";
    case FEDPEFT__ENVELOPE__BODY_UPDATE: return "Update";
    case FEDPEFT__ENVELOPE__BODY_COMMIT: return "Commit";
    case FEDPEFT__ENVELOPE__BODY_ACK: return "Ack";
    case FEDPEFT__ENVELOPE__BODY_HEARTBEAT: return "Heartbeat";
    case FEDPEFT__ENVELOPE__BODY_ERROR: return "Error";
    case FEDPEFT__ENVELOPE__BODY_BYE: return "Bye";
    case FEDPEFT__ENVELOPE__BODY_TASK_FAILED: return "TaskFailed";
    case FEDPEFT__ENVELOPE__BODY_RESUME: return "Resume";
    case FEDPEFT__ENVELOPE__BODY_SA_KEYS: return "SecAggKeys";
    case FEDPEFT__ENVELOPE__BODY_SA_ROSTER: return "SecAggRoster";
    case FEDPEFT__ENVELOPE__BODY_SA_SHARES: return "SecAggShares";
    case FEDPEFT__ENVELOPE__BODY_SA_RELAY: return "SecAggRelay";
    case FEDPEFT__ENVELOPE__BODY_SA_UNMASK: return "SecAggUnmask";
    case FEDPEFT__ENVELOPE__BODY_SA_REVEAL: return "SecAggReveal";
    default: return "unknown";
    }
}

int fp_msg_error_frame(Fedpeft__Error__Code code, const char *reason, unsigned char **out,
                       size_t *len, fp_err_t *err)
{
    Fedpeft__Envelope env = FEDPEFT__ENVELOPE__INIT;
    Fedpeft__Error e = FEDPEFT__ERROR__INIT;
    e.code = code;
    /* a reason may quote what a peer sent: escaped, it is one line of valid UTF-8 */
    char buf[FP_MAX_NAME];
    fp_escape(reason ? reason : "", buf, sizeof buf);
    e.reason = buf;
    env.body_case = FEDPEFT__ENVELOPE__BODY_ERROR;
    env.error = &e;
    return fp_msg_frame(&env, out, len, err);
}

static Fedpeft__Error__Code bad(char *reason, size_t n, Fedpeft__Error__Code code,
                                const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static Fedpeft__Error__Code bad(char *reason, size_t n, Fedpeft__Error__Code code,
                                const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, n, fmt, ap);
    va_end(ap);
    return code;
}

static int str_ok(const char *s)
{
    return !s || strlen(s) <= FP_MAX_NAME;
}

/* Privacy parameters: a known mode, finite and non-negative numbers, a rate in [0, 1]. */
static int privacy_ok(const Fedpeft__Privacy *p)
{
    if (!p)
        return 1;
    double v[] = {p->noise_multiplier, p->sample_rate, p->delta, p->epsilon_max,
                  p->epsilon_spent, p->clip, p->noise_stddev, p->count_stddev};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        if (!isfinite(v[i]) || v[i] < 0)
            return 0;
    return (unsigned)p->mode <= FEDPEFT__PRIVACY__MODE__DISTRIBUTED && p->sample_rate <= 1 &&
           p->global_rank <= 65536;
}

static Fedpeft__Error__Code check_tensors(Fedpeft__TensorInfo **t, size_t n, uint64_t total,
                                          char *reason, size_t rn)
{
    if (n > FP_MAX_TENSORS)
        return bad(reason, rn, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s lists too many tensors",
                   "message");
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const Fedpeft__TensorInfo *x = t[i];
        if (!str_ok(x->name) || !x->name || !x->name[0])
            return bad(reason, rn, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "tensor without a valid name");
        if (x->n_shape != 2 || x->shape[0] == 0 || x->shape[1] == 0 ||
            x->shape[0] > (1u << 24) || x->shape[1] > (1u << 24))
            return bad(reason, rn, FEDPEFT__ERROR__CODE__BAD_MESSAGE,
                       "tensor '%s': a LoRA factor is a matrix of at most 2^24 × 2^24", x->name);
        if (!x->dtype || strcmp(x->dtype, "F32") != 0)
            return bad(reason, rn, FEDPEFT__ERROR__CODE__BAD_MESSAGE,
                       "tensor '%s': dtype must be F32", x->name);
        if (x->nbytes != x->shape[0] * x->shape[1] * 4 || x->offset != off)
            return bad(reason, rn, FEDPEFT__ERROR__CODE__BAD_MESSAGE,
                       "tensor '%s': offsets and sizes must tile the stream", x->name);
        off += x->nbytes;
    }
    if (off != total)
        return bad(reason, rn, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                   "tensors do not cover the stream exactly");
    return 0;
}

static int sealed_ok(Fedpeft__SecAggSealed *const *s, size_t n)
{
    if (n > FP_SA_MAX_SITES)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i]->peer >= FP_SA_MAX_SITES || s[i]->data.len != FP_SA_SEALED_BYTES)
            return 0;
    return 1;
}

/* The secure-aggregation messages: every length bounded, every index in range. */
static Fedpeft__Error__Code check_secagg(const fp_env_t *e, char *reason, size_t n)
{
    int ok = 1;
    switch (e->body_case) {
    case FEDPEFT__ENVELOPE__BODY_SA_KEYS:
        ok = e->sa_keys->mask_key.len == 32 && e->sa_keys->seal_key.len == 32 &&
             e->sa_keys->signature.len > 0 && e->sa_keys->signature.len <= FP_SA_MAX_SIG;
        break;
    case FEDPEFT__ENVELOPE__BODY_SA_ROSTER:
        ok = e->sa_roster->n_peers <= FP_SA_MAX_SITES;
        for (size_t i = 0; ok && i < e->sa_roster->n_peers; i++) {
            const Fedpeft__SecAggPeer *p = e->sa_roster->peers[i];
            ok = p->index < FP_SA_MAX_SITES && p->site && str_ok(p->site) &&
                 p->certificate.len > 0 && p->certificate.len <= FP_SA_MAX_CERT &&
                 p->mask_key.len == 32 && p->seal_key.len == 32 && p->signature.len > 0 &&
                 p->signature.len <= FP_SA_MAX_SIG;
        }
        break;
    case FEDPEFT__ENVELOPE__BODY_SA_SHARES:
        ok = sealed_ok(e->sa_shares->sealed, e->sa_shares->n_sealed);
        break;
    case FEDPEFT__ENVELOPE__BODY_SA_RELAY:
        ok = sealed_ok(e->sa_relay->sealed, e->sa_relay->n_sealed) &&
             e->sa_relay->n_in_round <= FP_SA_MAX_SITES;
        for (size_t i = 0; ok && i < e->sa_relay->n_in_round; i++)
            ok = e->sa_relay->in_round[i] < FP_SA_MAX_SITES;
        break;
    case FEDPEFT__ENVELOPE__BODY_SA_UNMASK:
        ok = e->sa_unmask->n_asks <= FP_SA_MAX_SITES;
        for (size_t i = 0; ok && i < e->sa_unmask->n_asks; i++)
            ok = e->sa_unmask->asks[i]->peer < FP_SA_MAX_SITES &&
                 (e->sa_unmask->asks[i]->kind == 1 || e->sa_unmask->asks[i]->kind == 2);
        break;
    case FEDPEFT__ENVELOPE__BODY_SA_REVEAL:
        ok = e->sa_reveal->n_shares <= FP_SA_MAX_SITES;
        for (size_t i = 0; ok && i < e->sa_reveal->n_shares; i++)
            ok = e->sa_reveal->shares[i]->peer < FP_SA_MAX_SITES &&
                 (e->sa_reveal->shares[i]->kind == 1 || e->sa_reveal->shares[i]->kind == 2) &&
                 e->sa_reveal->shares[i]->share.len == FP_SA_SHARE_BYTES;
        break;
    default:
        break;
    }
    return ok ? 0 : bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE,
                        "%s: a field out of range", fp_msg_name(e));
}

static int secagg_task_ok(const Fedpeft__SecAgg *a)
{
    return !a || (a->sites >= 2 && a->sites <= FP_SA_MAX_SITES && a->index < a->sites &&
                  a->degree >= 1 && a->threshold >= 1 && a->threshold <= a->sites &&
                  isfinite(a->scale) && a->scale > 0 && isfinite(a->bound) && a->bound > 0 &&
                  a->seed.len == 32 && isfinite(a->weight) && a->weight >= 0 &&
                  a->weight <= 1 && a->dim >= 1 && a->dim <= (1ull << 24) && a->strategy &&
                  str_ok(a->strategy) && a->global_rank >= 1 && a->global_rank <= 65536 &&
                  a->pass <= 2 && a->sketch_k <= 65536);
}

Fedpeft__Error__Code fp_msg_check(const fp_env_t *e, char *reason, size_t n)
{
    if (e->version != FP_PROTOCOL_VERSION) {
        snprintf(reason, n, "protocol version %u is not supported (this peer speaks %u)",
                 e->version, FP_PROTOCOL_VERSION);
        return FEDPEFT__ERROR__CODE__UNSUPPORTED_VERSION;
    }
    switch (e->body_case) {
    case FEDPEFT__ENVELOPE__BODY_HELLO: {
        const Fedpeft__Hello *h = e->hello;
        if (!h->site_name || !h->site_name[0] || !str_ok(h->site_name))
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "Hello needs a site name of at most 256 bytes");
        if (!fp_utf8_ok(h->site_name, strlen(h->site_name), 0))
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "Hello: a site name holds no control characters");
        if (h->base_model_sha256.len != 32)
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "Hello needs the 32-byte SHA-256 of the base model");
        if (h->rank_budget == 0 || h->rank_budget > 65536)
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "Hello: rank budget must be in 1..65536");
        if (h->n_capabilities > 64)
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE,
                       "Hello: %zu capabilities, at most 64", h->n_capabilities);
        for (size_t i = 0; i < h->n_capabilities; i++)
            if (!str_ok(h->capabilities[i]) ||
                !fp_utf8_ok(h->capabilities[i], strlen(h->capabilities[i]), 0))
                return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                           "Hello: a capability is a name of at most 256 bytes without "
                           "control characters");
        return 0;
    }
    case FEDPEFT__ENVELOPE__BODY_WELCOME:
        if (!str_ok(e->welcome->federation) || !str_ok(e->welcome->site_id) ||
            !str_ok(e->welcome->strategy) || !privacy_ok(e->welcome->privacy))
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s", "Welcome: bad field");
        return 0;
    case FEDPEFT__ENVELOPE__BODY_TASK: {
        const Fedpeft__Task *t = e->task;
        if (t->rank == 0 || t->rank > 65536 || !isfinite(t->alpha) || t->alpha == 0 ||
            t->n_target_modules > 7)
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "Task: bad rank, alpha or targets");
        if (!privacy_ok(t->privacy))
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "Task: privacy parameters out of range");
        if (!secagg_task_ok(t->secagg))
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "Task: secure aggregation parameters out of range");
        if (t->hyper && (!isfinite(t->hyper->lr) || t->hyper->lr < 0 || t->hyper->steps > 10000000 ||
                         t->hyper->batch > 65536 || t->hyper->seq_len > (1u << 20)))
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "Task: hyper-parameters out of range");
        for (size_t i = 0; i < t->n_target_modules; i++)
            if (!str_ok(t->target_modules[i]))
                return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                           "Task: target name too long");
        return check_tensors(t->tensors, t->n_tensors, t->stream_bytes, reason, n);
    }
    case FEDPEFT__ENVELOPE__BODY_CHUNK:
        if (e->chunk->data.len == 0 || e->chunk->data.len > FP_MAX_CHUNK)
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "TensorChunk: data must hold 1 byte to 1 MiB");
        return 0;
    case FEDPEFT__ENVELOPE__BODY_UPDATE: {
        const Fedpeft__Update *u = e->update;
        if (u->rank == 0 || u->rank > 65536)
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s", "Update: bad rank");
        /* a loss may be NaN: not measured (a site without held-out data); never infinite */
        if (u->metrics && (isinf(u->metrics->train_loss) ||
                           isinf(u->metrics->eval_loss_before) ||
                           isinf(u->metrics->eval_loss_after) ||
                           !isfinite(u->metrics->clip_indicator)))
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "Update: metrics must be finite (a loss not measured: NaN)");
        return check_tensors(u->tensors, u->n_tensors, u->stream_bytes, reason, n);
    }
    case FEDPEFT__ENVELOPE__BODY_COMMIT:
        if (e->commit->sha256.len != 32)
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "Commit needs a 32-byte SHA-256");
        return 0;
    case FEDPEFT__ENVELOPE__BODY_ERROR:
    case FEDPEFT__ENVELOPE__BODY_BYE:
        return 0;
    case FEDPEFT__ENVELOPE__BODY_TASK_FAILED:
        if (e->task_failed->reason && strlen(e->task_failed->reason) > 1000)
            return bad(reason, n, FEDPEFT__ERROR__CODE__BAD_MESSAGE, "%s",
                       "TaskFailed: reason longer than 1000 bytes");
        return 0;
    case FEDPEFT__ENVELOPE__BODY_ACK:
    case FEDPEFT__ENVELOPE__BODY_HEARTBEAT:
    case FEDPEFT__ENVELOPE__BODY_RESUME:
        return 0;
    case FEDPEFT__ENVELOPE__BODY_SA_KEYS:
    case FEDPEFT__ENVELOPE__BODY_SA_ROSTER:
    case FEDPEFT__ENVELOPE__BODY_SA_SHARES:
    case FEDPEFT__ENVELOPE__BODY_SA_RELAY:
    case FEDPEFT__ENVELOPE__BODY_SA_UNMASK:
    case FEDPEFT__ENVELOPE__BODY_SA_REVEAL:
        return check_secagg(e, reason, n);
    default:
        return bad(reason, n, FEDPEFT__ERROR__CODE__UNKNOWN_TYPE, "%s",
                   "unknown message type (a newer peer?)");
    }
}

static const char *state_name(fp_pstate_t st)
{
    switch (st) {
    case FP_PS_GREETING: return "before the greeting";
    case FP_PS_READY: return "between transfers";
    case FP_PS_STREAMING: return "during a transfer";
    default: return "after the end";
    }
}

Fedpeft__Error__Code fp_msg_order(fp_role_t me, fp_pstate_t st, const fp_env_t *e,
                                  fp_pstate_t *next, char *reason, size_t n)
{
    int b = e->body_case;
    *next = st;
    if (b == FEDPEFT__ENVELOPE__BODY_BYE || b == FEDPEFT__ENVELOPE__BODY_ERROR) {
        *next = FP_PS_DONE;
        return st == FP_PS_DONE ? FEDPEFT__ERROR__CODE__OUT_OF_ORDER : 0;
    }
    int ok = 0;
    switch (st) {
    case FP_PS_GREETING:
        ok = b == (me == FP_ROLE_SERVER ? FEDPEFT__ENVELOPE__BODY_HELLO
                                        : FEDPEFT__ENVELOPE__BODY_WELCOME);
        *next = FP_PS_READY;
        break;
    case FP_PS_READY:
        ok = b == FEDPEFT__ENVELOPE__BODY_HEARTBEAT;
        if (me == FP_ROLE_SERVER && (b == FEDPEFT__ENVELOPE__BODY_UPDATE ||
                                     b == FEDPEFT__ENVELOPE__BODY_RESUME)) {
            ok = 1;
            *next = FP_PS_STREAMING;
        }
        ok |= me == FP_ROLE_SERVER && b == FEDPEFT__ENVELOPE__BODY_TASK_FAILED;
        ok |= me == FP_ROLE_SERVER && (b == FEDPEFT__ENVELOPE__BODY_SA_KEYS ||
                                       b == FEDPEFT__ENVELOPE__BODY_SA_SHARES ||
                                       b == FEDPEFT__ENVELOPE__BODY_SA_REVEAL);
        ok |= me == FP_ROLE_CLIENT && (b == FEDPEFT__ENVELOPE__BODY_SA_ROSTER ||
                                       b == FEDPEFT__ENVELOPE__BODY_SA_RELAY ||
                                       b == FEDPEFT__ENVELOPE__BODY_SA_UNMASK);
        if (me == FP_ROLE_CLIENT) {
            if (b == FEDPEFT__ENVELOPE__BODY_TASK) {
                ok = 1;
                *next = FP_PS_STREAMING;
            }
            ok |= b == FEDPEFT__ENVELOPE__BODY_ACK;
        }
        break;
    case FP_PS_STREAMING:
        ok = b == FEDPEFT__ENVELOPE__BODY_CHUNK || b == FEDPEFT__ENVELOPE__BODY_HEARTBEAT;
        /* a secure round's messages do not wait for a stream to end */
        ok |= me == FP_ROLE_SERVER && (b == FEDPEFT__ENVELOPE__BODY_SA_KEYS ||
                                       b == FEDPEFT__ENVELOPE__BODY_SA_SHARES ||
                                       b == FEDPEFT__ENVELOPE__BODY_SA_REVEAL);
        ok |= me == FP_ROLE_CLIENT && (b == FEDPEFT__ENVELOPE__BODY_SA_ROSTER ||
                                       b == FEDPEFT__ENVELOPE__BODY_SA_RELAY ||
                                       b == FEDPEFT__ENVELOPE__BODY_SA_UNMASK);
        if (b == FEDPEFT__ENVELOPE__BODY_COMMIT) {
            ok = 1;
            *next = FP_PS_READY;
        }
        /* the server acknowledges durable prefixes while the client keeps sending */
        ok |= me == FP_ROLE_CLIENT && b == FEDPEFT__ENVELOPE__BODY_ACK;
        break;
    default:
        break;
    }
    if (!ok) {
        *next = st;
        snprintf(reason, n, "%s may not come %s", fp_msg_name(e), state_name(st));
        return FEDPEFT__ERROR__CODE__OUT_OF_ORDER;
    }
    return 0;
}

int fp_msg_tensors_pack(const fp_stream_tensor_t *t, int n, Fedpeft__TensorInfo ***out)
{
    /* layout: n pointers, n messages, n shapes */
    size_t cnt = n > 0 ? (size_t)n : 0;
    Fedpeft__TensorInfo **p = malloc(cnt * (sizeof *p + sizeof **p + 2 * sizeof(uint64_t)) + 1);
    *out = p;
    if (!p)
        return -ENOMEM;
    Fedpeft__TensorInfo *ti = (Fedpeft__TensorInfo *)(p + cnt);
    uint64_t *shapes = (uint64_t *)(ti + cnt);
    for (size_t i = 0; i < cnt; i++) {
        fedpeft__tensor_info__init(&ti[i]);
        ti[i].name = (char *)t[i].name;
        shapes[2 * i] = t[i].rows;
        shapes[2 * i + 1] = t[i].cols;
        ti[i].shape = &shapes[2 * i];
        ti[i].n_shape = 2;
        ti[i].dtype = "F32";
        ti[i].offset = t[i].offset;
        ti[i].nbytes = t[i].nbytes;
        p[i] = &ti[i];
    }
    return 0;
}

int fp_msg_tensors_unpack(Fedpeft__TensorInfo *const *ti, size_t n, fp_stream_tensor_t **out)
{
    fp_stream_tensor_t *t = malloc((n ? n : 1) * sizeof *t);
    *out = t;
    if (!t)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++)
        t[i] = (fp_stream_tensor_t){ti[i]->name, ti[i]->n_shape > 0 ? ti[i]->shape[0] : 0,
                                    ti[i]->n_shape > 1 ? ti[i]->shape[1] : 0, ti[i]->offset,
                                    ti[i]->nbytes};
    return 0;
}
