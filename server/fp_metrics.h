/* fp_metrics.h — Prometheus text metrics on HTTP GET /metrics (libmicrohttpd, its own
 * thread; counters are read atomically from the coordinator). */
#ifndef FP_METRICS_H
#define FP_METRICS_H

#include "fp_coord.h"
#include "fp_error.h"

typedef struct fp_metrics fp_metrics_t;

/* Serves on host:port (port 0: any); *port_out (optional) receives the port. */
int fp_metrics_start(fp_metrics_t **out, const char *hostport, fp_coord_t *co, int *port_out,
                     fp_err_t *err);
void fp_metrics_stop(fp_metrics_t *m);

#endif
