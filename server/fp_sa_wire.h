/* fp_sa_wire.h — a secure round's messages (fp_msg.h, protobuf) to and from the plain values
 * of its machine (fp_sa_round.h). The coordinator sends what the machine decides through
 * these, and hands the sites' SecAgg messages to fp_sa_wire_message. Sizes of the fields were
 * checked when the envelope was read (fp_msg.c). */
#ifndef FP_SA_WIRE_H
#define FP_SA_WIRE_H

#include "fp_msg.h"
#include "fp_sa_round.h"

/* Sends one envelope to a site: 0 or < 0. */
typedef int (*fp_sa_send_fn)(void *ctx, const char *site, Fedpeft__Envelope *e);

int fp_sa_wire_roster(fp_sa_send_fn send, void *ctx, const char *site, int64_t round, int pass,
                      const fp_sa_peer_t *peers, int n);
int fp_sa_wire_relay(fp_sa_send_fn send, void *ctx, const char *site, int64_t round, int pass,
                     const fp_sa_sealed_t *sealed, int ns, const uint32_t *in_round, int nin);
int fp_sa_wire_unmask(fp_sa_send_fn send, void *ctx, const char *site, int64_t round, int pass,
                      const fp_sa_ask_t *asks, int na);

/* A Task's secure part, pointing into ti (which must outlive m). */
void fp_sa_wire_task(const fp_sa_task_info_t *ti, const char *strategy, int global_rank,
                     Fedpeft__SecAgg *m);

/* A site's SecAgg message for the round's machine (cert: the site's certificate, DER, for
 * its keys). 0, or the Error code to end the session with (reason). */
int fp_sa_wire_message(fp_sa_round_t *sa, const char *site, const Fedpeft__Envelope *e,
                       const uint8_t *cert, size_t cert_len, char *reason, size_t n);

#endif
