/* sim.h — `fedpeft sim`: a whole federation on one machine.
 *
 * The simulation splits category-labelled text (Debian's fortunes by default) into sites,
 * makes a throw-away certificate authority, and runs the real fedpeft-server and one
 * fedpeft-client per site over loopback mutual TLS — the code paths of a deployment. Sites
 * take turns training (train.slot_dir: as many at once as there are cores). Afterwards it
 * trains each site alone (local-only) for as many steps as it trained in the federation, and
 * evaluates the base model, the local-only adapters and each strategy's final global adapter
 * on every site's held-out documents, which no training saw.
 *
 * Layout of --out:
 *   data/<site>/train.txt, heldout.txt   each site's documents ("%" lines between them)
 *   <strategy>/state/fedpeft.db          the coordinator's database (and adapters/)
 *   <strategy>/global-adapter/           the final global adapter (HF PEFT)
 *   <strategy>/logs/                     server.log, <site>.log
 *   local/<site>/                        local-only adapters (HF PEFT)
 *   metrics.csv, results.json, report.html
 */
#ifndef FP_SIM_H
#define FP_SIM_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"

enum { SIM_BY_CATEGORY, SIM_DIRICHLET, SIM_IID };

typedef struct sim_site {
    char name[32];
    int rank;
    char cats[512];      /* its categories, with their share when mixed */
    size_t ntrain, nheld; /* documents */
    char *train, *held;  /* paths */
} sim_site_t;

typedef struct sim {
    /* options */
    int nsites, rounds, steps, batch, seq, slots;
    double lr, alpha;
    int *ranks;          /* nsites */
    int partition;
    double dir_alpha;
    char **data;         /* category files */
    int ndata;
    const char *model, *out, *targets;
    uint64_t seed;
    const char **strategies;
    int nstrat;
    /* made */
    sim_site_t *sites;
    char *pki, *slot_dir;
    char server_bin[4096], client_bin[4096], self_bin[4096];
    char model_sha[65];
} sim_t;

/* Reads the categories, partitions their documents into sites (sim->partition), holds out
 * documents of each site and writes out/data/<site>/. */
int sim_make_data(sim_t *sim, fp_err_t *err);

/* The throw-away certificate authority: a coordinator certificate for 127.0.0.1 and a kit per
 * site, in sim->pki. */
int sim_make_pki(sim_t *sim, fp_err_t *err);

/* One federation with a strategy, to the end; progress lines on stdout. The run's directory
 * is out/<strategy>/. */
int sim_run_federation(sim_t *sim, const char *strategy, fp_err_t *err);

/* Local-only adapters: each site alone, rounds × steps steps (out/local/<site>/). */
int sim_train_local(sim_t *sim, fp_err_t *err);

/* Held-out loss of the base model, the local-only adapters and each strategy's global adapter
 * on each site's held-out data and pooled: the "table" object of the report. */
int sim_evaluate(sim_t *sim, json_t **table, fp_err_t *err);

/* Paths of the simulation: --out is bounded so that every path fits SIM_PATH_MAX. */
#define SIM_PATH_MAX 4096
#define SIM_OUT_MAX 2048
int sim_path(char *buf, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Spawns argv with stdout/stderr to log (NULL: inherited); 0 and *pid, or an error. */
int sim_spawn(const char *const *argv, const char *log, int *pid, fp_err_t *err);

/* ---- the report (report.c) ---- */

/* One run's record from a coordinator's state directory: federation, sites, rounds, tasks. */
int fp_report_collect(const char *state_dir, json_t **run, fp_err_t *err);
/* The self-contained report.html of doc {"title", "config"?, "sites"?, "runs": [...],
 * "table"?}. */
int fp_report_write(json_t *doc, const char *path, fp_err_t *err);

#endif
