#!/bin/sh
# deploy/demo.sh — set up this machine, build fedpeft, and run its main job on built-in
# defaults: `fedpeft sim`, a whole federation on this machine.
#
# Six sites hold different private data (pairs of Debian fortunes categories: computers and
# linux, science and education, medicine and drugs, food and love, law and politics, sports
# and work) and LoRA ranks 4, 4, 8, 8, 16, 16. The real coordinator and six site daemons
# fine-tune the demo base model (models/demo) over loopback mutual TLS for 10 rounds with
# flexlora; each site also trains alone; everything is evaluated on held-out fortunes no
# training saw. Results, the coordinator's database and report.html go to out/sim/.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
./deploy/setup.sh deps
./deploy/setup.sh build build -DCMAKE_BUILD_TYPE=Release
exec build/cli/fedpeft sim "$@"
