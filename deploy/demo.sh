#!/bin/sh
# deploy/demo.sh [fedpeft sim options] — set up this machine, build fedpeft, and run its main
# job on built-in defaults: `fedpeft sim`, a whole federation on this machine.
#
# Six sites each hold texts in two languages (English+German, Italian+Spanish,
# Portuguese+Esperanto, Polish+Czech, Bulgarian+Russian, Irish+Chinese, from Debian's fortunes
# packages) and LoRA ranks 4, 4, 8, 8, 16, 16. The real coordinator and six site daemons
# fine-tune the demo base model (models/demo) over loopback mutual TLS to name a text's
# language; each site also trains alone, and one adapter trains on all the data pooled (what
# sharing the data would give). Everything is scored on held-out texts no training saw, as the
# share of the centralised gain each approach recovers. Results, the coordinator's database and
# report.html go to out/sim/. Options are passed to `fedpeft sim` (see its --help).
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
./deploy/setup.sh deps
# the demo needs no test packages: the test suite is built by deploy/test.sh
./deploy/setup.sh build build -DCMAKE_BUILD_TYPE=Release -DFP_TESTS=OFF
exec build/cli/fedpeft sim "$@"
