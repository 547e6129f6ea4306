/* bench.h — `fedpeft bench`: speed and memory, each measured beside a ceiling or a peer in
 * the same run (the machine's streaming bandwidth, its BLAS peak, a dense LAPACK SVD, a
 * PyTorch run of the same training), never against a number fixed in advance.
 *   merge        fedavg bandwidth, streaming-merge memory, factored against dense SVD
 *   train        the trainer's tokens/s (a ViT's images/s) and its share of the BLAS peak,
 *                beside PyTorch
 *   transport    uploads through mutual TLS against the raw loopback and disk
 *   coordinator  a coordinator process with many sites: round latency, memory, CPU
 *   flood        connection floods: the coordinator keeps serving its sites
 *   secagg       secure aggregation's arithmetic and bytes beside the plaintext sum */
#ifndef FP_BENCH_H
#define FP_BENCH_H

#include <stdint.h>
#include <sys/types.h>

#include "fp_error.h"

extern const char fp_bench_help[];

int fp_bench_merge(int argc, char **argv);
int fp_bench_train(int argc, char **argv);
int fp_bench_transport(int argc, char **argv);
int fp_bench_coord(int argc, char **argv);
int fp_bench_flood(int argc, char **argv);
int fp_bench_secagg(int argc, char **argv);
/* bench train's vit-small (bench_vit.c): images/s beside peak (sgemm GFLOP/s) and PyTorch. */
int fp_bench_vit(int threads, int torch, double peak);

/* A working directory: given (created), or a new prefix-XXXXXX in $TMPDIR or /tmp (malloc'd;
 * NULL on failure). */
char *fp_bench_workdir(const char *given, const char *prefix);

/* fedpeft-server (given, or found as fp_find_program does), with the open-file limit raised
 * for fds connections ("what" names them in the error) and SIGPIPE ignored. 0, or an exit
 * code after saying why. */
int fp_bench_find_server(const char *given, char srv[4096], long long fds, const char *what);

/* A tiny Llama config (2 layers, hidden size dim, MLP ff) written to path: the federation's
 * "model" (coordinators only read its config); sha receives its identity. */
int fp_bench_tiny_model(const char *path, int dim, int ff, uint8_t sha[32], fp_err_t *err);

/* Starts fedpeft-server --config cfg (stderr to log) and waits for its port. */
int fp_bench_spawn_server(const char *srv, const char *cfg, const char *log, pid_t *pid,
                          int *port, fp_err_t *err);

#endif
