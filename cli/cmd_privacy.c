/* fedpeft privacy — plan a differentially private federation before running it: the ε a
 * mechanism spends (RDP of the sampled Gaussian, fp_rdp.h), or the noise a budget needs. */
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "cli.h"
#include "fp_rdp.h"

static const char privacy_help[] =
    "Usage: fedpeft privacy --sample-rate Q --rounds T --delta D\n"
    "                       (--noise-multiplier Z | --epsilon E) [--json]\n"
    "\n"
    "The privacy of client-level DP-FedAvg as fedpeft accounts it: each round draws every\n"
    "site independently with probability Q (federation.fraction) and adds Gaussian noise of\n"
    "standard deviation Z·C to the sum of updates clipped to C. With --noise-multiplier, prints\n"
    "the ε spent after T rounds at δ; with --epsilon, the smallest Z that keeps T rounds within\n"
    "(E, δ). Rényi DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019) at orders\n"
    "1.1 ... 10.9 and 11 ... 256, converted with Balle et al. 2020's bound (the classic one with\n"
    "--classic).\n"
    "\n"
    "  -q, --sample-rate Q       probability that a site is drawn into a round (0 < Q <= 1)\n"
    "  -z, --noise-multiplier Z  noise standard deviation over the clip bound\n"
    "  -e, --epsilon E           the budget: print the Z it needs instead\n"
    "  -t, --rounds T            rounds (draws of sites)\n"
    "  -d, --delta D             δ (default 1e-5)\n"
    "      --classic             the classic RDP-to-(ε, δ) conversion\n"
    "      --json                one JSON object: epsilon, noise_multiplier, ...\n"
    "  -h, --help                this help\n";

int fp_cmd_privacy(int argc, char **argv)
{
    static const struct option opts[] = {{"sample-rate", required_argument, NULL, 'q'},
                                         {"noise-multiplier", required_argument, NULL, 'z'},
                                         {"epsilon", required_argument, NULL, 'e'},
                                         {"rounds", required_argument, NULL, 't'},
                                         {"delta", required_argument, NULL, 'd'},
                                         {"classic", no_argument, NULL, 'c'},
                                         {"json", no_argument, NULL, 'j'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    double q = NAN, z = NAN, eps = NAN, delta = 1e-5;
    long long rounds = -1;
    int json = 0, classic = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "q:z:e:t:d:h", opts, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case 'q': bad = fp_parse_double(optarg, &q) || !(q > 0 && q <= 1); break;
        case 'z': bad = fp_parse_double(optarg, &z) || !(z > 0); break;
        case 'e': bad = fp_parse_double(optarg, &eps) || !(eps > 0); break;
        case 't': bad = fp_parse_int(optarg, 0, 1000000000, &rounds); break;
        case 'd': bad = fp_parse_double(optarg, &delta) || !(delta > 0 && delta < 1); break;
        case 'c': classic = 1; break;
        case 'j': json = 1; break;
        case 'h': fputs(privacy_help, stdout); return FP_EXIT_OK;
        default: return fp_cli_usage_error("privacy", "unknown option");
        }
        if (bad)
            return fp_cli_usage_error("privacy", "bad value '%s' for %s", optarg,
                                      argv[optind - 1]);
    }
    if (optind < argc)
        return fp_cli_usage_error("privacy", "unexpected argument '%s'", argv[optind]);
    if (isnan(q) || rounds < 0)
        return fp_cli_usage_error("privacy", "--sample-rate and --rounds are required");
    if (isnan(z) == isnan(eps))
        return fp_cli_usage_error("privacy", "give one of --noise-multiplier and --epsilon");
    if (classic && !isnan(eps))
        return fp_cli_usage_error("privacy", "--classic reports ε for a given "
                                  "--noise-multiplier; --epsilon solves with the tight bound");
    fp_err_t err = {0};
    if (isnan(z) && fp_rdp_noise_for(q, (double)rounds, eps, delta, &z, &err) != 0)
        return fp_cli_fail("privacy", "%s", fp_err_msg(&err));
    double alpha, spent = fp_rdp_epsilon(q, z, (double)rounds, delta, classic, &alpha);
    if (json) {
        json_t *j = json_pack("{s:o,s:f,s:f,s:I,s:f,s:s}", "epsilon",
                              isfinite(spent) ? json_real(spent) : json_null(),
                              "noise_multiplier", z, "sample_rate", q, "rounds",
                              (json_int_t)rounds, "delta", delta, "conversion",
                              classic ? "classic" : "balle2020");
        if (j && isfinite(alpha))
            json_object_set_new(j, "order", json_real(alpha));
        char *s = j ? json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
        puts(s ? s : "{}");
        free(s);
        json_decref(j);
        return FP_EXIT_OK;
    }
    if (!isnan(eps))
        printf("noise multiplier z = %.4f keeps %lld rounds at sampling rate %g within "
               "ε = %g (δ = %g)\n", z, rounds, q, eps, delta);
    printf("ε = %.4f after %lld rounds (sampling rate %g, noise multiplier %g, δ = %g; best "
           "RDP order %g)\n", spent, rounds, q, z, delta, alpha);
    return FP_EXIT_OK;
}
