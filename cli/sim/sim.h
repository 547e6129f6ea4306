/* sim.h — `fedpeft sim`: a whole federation on one machine.
 *
 * The simulation splits labelled text (by default texts in 12 languages from Debian's fortunes
 * packages) into sites, makes a throw-away certificate authority, and runs the real
 * fedpeft-server and one fedpeft-client per site over loopback mutual TLS — the code paths of a
 * deployment. Sites take turns training (train.slot_dir: as many at once as there are cores).
 * Afterwards it trains two baselines with the same total work: each site alone (local-only,
 * as many steps as it trained in the federation) and one adapter on all the sites' training
 * data pooled (centralised, as many steps as all sites together). The base model, the
 * baselines and each strategy's final global adapter are evaluated on every site's held-out
 * documents, which no training saw; each approach's score is read as the share of the
 * centralised gain it recovers, (X − base) / (centralised − base).
 *
 * The task: by default each document becomes a classification example — its beginning as the
 * prompt, its category's name as the completion — scored by accuracy (the label the model
 * writes, fp_choice.h) and by the label's loss; `--task lm` keeps the documents as text,
 * scored by held-out loss.
 *
 * Layout of --out:
 *   data/<site>/train.jsonl, heldout.jsonl  each site's examples (train.txt, heldout.txt with
 *                                        "%" lines between documents for --task lm)
 *   <run>/state/fedpeft.db               the coordinator's database (and adapters/); a run is
 *                                        a strategy, or a strategy at a DP budget (--dp)
 *   <run>/global-adapter/                the final global adapter (HF PEFT)
 *   <run>/logs/                          server.log, <site>.log
 *   local/<site>/, central/              the baselines' adapters (HF PEFT)
 *   metrics.csv, results.json, report.html
 */
#ifndef FP_SIM_H
#define FP_SIM_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "fp_error.h"

enum { SIM_BY_CATEGORY, SIM_DIRICHLET, SIM_IID };
enum { SIM_TASK_CLASSIFY, SIM_TASK_LM, SIM_TASK_IMAGE };

/* A category: its label and the files of its documents. */
typedef struct sim_cat {
    char *name;
    char **files;
    int nfiles;
} sim_cat_t;

typedef struct sim_site {
    char name[32];
    int rank;
    char cats[512];      /* its categories, with their share when mixed */
    size_t ntrain, nheld; /* documents */
    char *train, *held;  /* paths */
} sim_site_t;

/* One federation of the simulation: a strategy, with or without differential privacy. */
typedef struct sim_run {
    const char *strategy;
    char name[48];       /* its directory under --out: "flexlora", "ffa-dp-eps8" */
    char label[48];      /* how tables and the report name it: "ffa", "ffa ε=8" */
    double epsilon;      /* the DP budget for all its rounds (0: no DP) */
    double noise;        /* the noise multiplier that keeps the rounds within it */
    int secure;          /* secure aggregation: the coordinator sees only sums */
} sim_run_t;

typedef struct sim {
    /* options */
    int nsites, rounds, steps, batch, seq, slots;
    double lr, alpha;
    int *ranks;          /* nsites */
    int partition;
    double dir_alpha;
    int task;            /* SIM_TASK_* */
    int prompt_bytes;    /* classify: the prompt is a document's first bytes, at most this many */
    int max_docs;        /* documents per category at most (0: all) */
    const char *cue;     /* classify: the prompt's last line, before the label ("Language: ") */
    sim_cat_t *cats;
    int ncats;
    const char *model, *out, *targets;
    uint64_t seed;
    sim_run_t *runs;
    int nruns;
    const char *dp_mode; /* NULL, "central" or "distributed": the runs with epsilon > 0 */
    double dp_clip;      /* their clip bound C */
    int secure;          /* --secure-aggregation: each run also (with --dp: only) securely */
    const char *base_dtype; /* the frozen base's precision everywhere: f32, bf16, nf4 (auto resolved) */
    const char *server_opt; /* the coordinator's server optimizer (fp_server_opt.h) */
    double server_lr, server_beta1;
    double prox_mu;      /* FedProx's μ at the sites (0: off) */
    /* made */
    sim_site_t *sites;
    char *pki, *slot_dir;
    char *pooled_train;  /* --task image: every site's training images ("IMAGES,LABELS") */
    char server_bin[4096], client_bin[4096], self_bin[4096];
    char model_sha[65];
} sim_t;

/* Reads the categories, partitions their documents into sites (sim->partition), holds out
 * documents of each site and writes out/data/<site>/. */
int sim_make_data(sim_t *sim, fp_err_t *err);

/* The throw-away certificate authority: a coordinator certificate for 127.0.0.1 and a kit per
 * site, in sim->pki. */
int sim_make_pki(sim_t *sim, fp_err_t *err);

/* One federation, to the end; progress lines on stdout. Its directory is out/<run->name>/. */
int sim_run_federation(sim_t *sim, const sim_run_t *run, fp_err_t *err);

/* The baselines, as `fedpeft train` processes (as many at once as slots): each site alone for
 * rounds × steps steps (out/local/<site>/), and one adapter of the largest rank on every
 * site's training data for sites × rounds × steps steps (out/central/). */
int sim_train_baselines(sim_t *sim, fp_err_t *err);

/* The scoreboard: the base model, the baselines and each strategy's global adapter on each
 * site's held-out data and pooled — loss, accuracy (classify) and the share of the
 * centralised gain: the "table" object of the report. */
int sim_evaluate(sim_t *sim, json_t **table, fp_err_t *err);

/* --task image (sim_image.c): the sites' Fashion-MNIST images of classes 5-9 with label skew
 * (two classes a site, sim->max_docs images of each, a fifth held out), as IDX pairs under
 * out/data/, and every site's training images pooled. */
int sim_make_images(sim_t *sim, fp_err_t *err);
/* The argv of `fedpeft vision train` for a baseline (job < nsites: that site alone; nsites:
 * centralised) writing to out; num holds its numbers (6 × 32 bytes). Returns argc. */
int sim_image_baseline_argv(const sim_t *sim, int job, const char *out, const char **argv,
                            char (*num)[32]);
/* "images" or "documents". */
const char *sim_units(const sim_t *sim);

/* Frees what sim_make_data and the option parsing allocated in sim. */
void sim_free(sim_t *sim);

/* δ of the simulation's DP runs. */
#define SIM_DP_DELTA 1e-5

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
