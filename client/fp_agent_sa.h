/* fp_agent_sa.h — a site's part in one secure round (peft/secagg/fp_secagg.h on the wire):
 * its keys, signed with the site certificate's key; the peers' keys, checked against the
 * federation's CA before any share is sealed to them; the shares it receives; its one masked
 * input; and the unmasking answers, never both kinds for one peer. The update itself never
 * leaves the site in the clear.
 *
 * Exact merges take two sums (fp_sa_merge.h): the first masks the sketch Y of the trained
 * adapter, which stays in memory; the coordinator's second Task for the same task id brings
 * the bases Q, and fp_asa_second makes the second sum's state (fresh keys; the first's are
 * dropped) that masks Z. A restarted site has neither: the round goes on without it. */
#ifndef FP_AGENT_SA_H
#define FP_AGENT_SA_H

#include <stddef.h>
#include <stdint.h>

#include "fp_adapter.h"
#include "fp_error.h"
#include "fp_msg.h"
#include "fp_sa_sign.h"
#include "fp_site.h"

typedef struct fp_asa fp_asa_t;

/* The site's state for task t (t->secagg.present): fresh keys from OpenSSL's generator. */
int fp_asa_new(fp_asa_t **out, const fp_site_task_t *t, const char *site, fp_err_t *err);
void fp_asa_free(fp_asa_t *a);
uint64_t fp_asa_task(const fp_asa_t *a);
int fp_asa_ready(const fp_asa_t *a);    /* the shares came: it can mask its input */
int fp_asa_pass(const fp_asa_t *a);     /* which sum of the round (1, or 2) */
/* The second sum of task t (t->secagg.pass == 2, its stream the bases), from the first's
 * state, whose layout, sketch and kept adapter it takes over (the caller frees `first`). */
int fp_asa_second(fp_asa_t **out, fp_asa_t *first, const fp_site_task_t *t, const char *site,
                  fp_err_t *err);

/* Phase 1: SecAggKeys, signed. */
int fp_asa_send_keys(fp_asa_t *a, fp_site_t *s, fp_sa_signer_t *signer, fp_err_t *err);
/* Phase 2: the roster's keys checked (certificates, names, signatures); shares sealed to the
 * neighbours in it and sent. */
int fp_asa_on_roster(fp_asa_t *a, fp_site_t *s, fp_sa_verifier_t *v,
                     const Fedpeft__SecAggRoster *r, fp_err_t *err);
/* Phase 2, end: the shares sealed to this site, and who is in the round. */
int fp_asa_on_relay(fp_asa_t *a, const Fedpeft__SecAggRelay *r, fp_err_t *err);
/* Phase 3: the masked vector of the trained adapter u (of `samples` samples), as bytes
 * (malloc'd, 4·dim); in an exact merge's first sum u is kept for the second. */
int fp_asa_mask(fp_asa_t *a, const fp_adapter_t *u, uint64_t samples, unsigned char **out,
                size_t *len, fp_err_t *err);
/* The second sum's upload once its shares are in: 1 with *u filled (its data lives in a
 * until stored or freed), 0 when there is none to send, < 0 on failure. */
int fp_asa_second_upload(fp_asa_t *a, fp_site_update_t *u, fp_err_t *err);
/* The coordinator stored task's upload. */
void fp_asa_stored(fp_asa_t *a, uint64_t task);
/* The one tensor the masked upload holds. */
fp_stream_tensor_t fp_asa_tensor(const fp_asa_t *a);
/* Phase 4: the asked shares, unless the request is one an honest site refuses. */
int fp_asa_on_unmask(fp_asa_t *a, fp_site_t *s, const Fedpeft__SecAggUnmask *u, fp_err_t *err);

#endif
