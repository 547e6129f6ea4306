/* Runs a libFuzzer target over files or directories once, without libFuzzer: the corpus
 * becomes a regression test in every build, gcc included. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fp_fs.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path)
{
    char *buf;
    size_t len;
    fp_err_t err;
    if (fp_fs_read_file(path, 64u << 20, &buf, &len, &err) != 0) {
        fprintf(stderr, "%s\n", fp_err_msg(&err));
        return 1;
    }
    /* an exact-size copy so that ASan catches any overread */
    uint8_t *exact = malloc(len ? len : 1);
    memcpy(exact, buf, len);
    free(buf);
    LLVMFuzzerTestOneInput(exact, len);
    free(exact);
    return 0;
}

int main(int argc, char **argv)
{
    int n = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        if (!fp_fs_is_dir(argv[i])) {
            bad |= run_file(argv[i]);
            n++;
            continue;
        }
        DIR *d = opendir(argv[i]);
        struct dirent *de;
        while (d && (de = readdir(d)) != NULL) {
            if (de->d_name[0] == '.')
                continue;
            char *p = fp_path_join(argv[i], de->d_name);
            bad |= run_file(p);
            free(p);
            n++;
        }
        if (d)
            closedir(d);
    }
    printf("replayed %d inputs\n", n);
    return bad || n == 0;
}
