/* fp_federation.h — the federation's record: created on a coordinator's first start, and on
 * every later start checked against the configuration (what cannot change once sites have
 * trained — the name, strategy, base model, targets, ranks and the privacy mechanism with its
 * budget — did not). */
#ifndef FP_FEDERATION_H
#define FP_FEDERATION_H

#include "fp_db.h"
#include "fp_fed.h"
#include "fp_srv_config.h"

/* Creates the federation (its first global adapter written) or checks it. */
int fp_federation_open(fp_db_t *db, const fp_srv_config_t *c, const fp_fed_t *fed,
                       fp_err_t *err);
/* The privacy mechanism the configuration asks for, as recorded. */
void fp_federation_privacy(const fp_srv_config_t *c, const fp_fed_t *fed, fp_db_privacy_t *p);

#endif
