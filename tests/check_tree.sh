#!/bin/sh
# The source tree's shape (issue 27): among server/ and client/ files, includes of siblings go
# one way (no cycle: tsort finds none); no file there over 900 lines; no function over 120
# lines in cli/, server/ or client/. What still exceeds a limit is named below, so the list
# can only shrink: a file or function that grows past a limit fails, and so does one listed
# here that no longer exceeds it (take it off the list).
set -u
cd "$(dirname "$0")/.."
known_files=""
known_funcs=""
fail=0

for dir in server client; do
    pairs=$(for f in "$dir"/*.c "$dir"/*.h; do
        me=$(basename "$f" | sed 's/\.[ch]$//')
        echo "$me $me"
        grep -o '^#include "[^"]*\.h"' "$f" | sed 's/#include "//; s/\.h"$//' | while read -r inc; do
            [ -f "$dir/$inc.h" ] && [ "$inc" != "$me" ] && echo "$me $inc"
        done
    done)
    if ! echo "$pairs" | tsort >/dev/null 2>/tmp/check_tree.$$; then
        echo "FAIL: an include cycle among $dir/ files: $(grep -v 'input contains a loop' /tmp/check_tree.$$ | sed 's/^tsort: //' | tr '\n' ' ')"
        fail=1
    fi
    rm -f /tmp/check_tree.$$
done

for f in server/*.c server/*.h client/*.c client/*.h; do
    n=$(wc -l < "$f")
    listed=0
    for k in $known_files; do [ "$k" = "$f" ] && listed=1; done
    if [ "$n" -gt 900 ] && [ $listed = 0 ]; then
        echo "FAIL: $f has $n lines (at most 900)"; fail=1
    elif [ "$n" -le 900 ] && [ $listed = 1 ]; then
        echo "FAIL: $f has $n lines now: take it off known_files"; fail=1
    elif [ $listed = 1 ]; then
        echo "known: $f has $n lines (at most 900)"
    fi
done

# functions: a definition starts at a line beginning with a name and '(' (not ending in ';')
# and ends at the '}' in column 0
long=$(for f in $(find cli server client -name '*.c' | sort); do
    awk -v F="$f" '
        /^[A-Za-z_].*\(/ && !/;[ \t]*$/ && !inb { start = NR; name = $0 }
        /^\{/ { inb = 1 }
        /^\}/ { if (inb && start) { n = NR - start + 1
                    if (n > 120) { sub(/\(.*/, "", name); k = split(name, w, /[ *]+/)
                                   printf "%s:%s %d\n", F, w[k], n } }
                inb = 0; start = 0 }' "$f"
done)
echo "$long" | while read -r fn n; do
    [ -z "$fn" ] && continue
    case " $known_funcs " in
    *" $fn "*) echo "known: $fn is $n lines (at most 120)" ;;
    *) echo "FAIL: $fn is $n lines (at most 120)"; echo x >> /tmp/check_tree_fail.$$ ;;
    esac
done
[ -f /tmp/check_tree_fail.$$ ] && { rm -f /tmp/check_tree_fail.$$; fail=1; }
for k in $known_funcs; do
    echo "$long" | grep -q "^$k " || { echo "FAIL: $k is within 120 lines now: take it off known_funcs"; fail=1; }
done
[ $fail = 0 ] && echo "the tree's shape holds"
exit $fail
