/*
 * fuzz.h - what the libFuzzer targets in fuzz/ share: a file in memory.
 *
 * Several parsers take a path, not bytes (st_open, model_load_config,
 * moe_open_packed). Rather than add a second entry to each, a target writes
 * the input into one memfd made at start and passes "/proc/self/fd/N": the
 * library then runs its real open path (stat, open, fstat, mmap or read) on a
 * regular file that never touches the disk. One memfd per process, rewritten
 * per input (truncate, then write), so a run leaves nothing behind.
 */
#ifndef TD_FUZZ_H
#define TD_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

/* The path of a memfd holding data[0..n), or NULL (the target then skips the
 * input). The path stays the same for the life of the process. */
static inline const char *fuzz_memfile(const uint8_t *data, size_t n)
{
    static int fd = -1;
    static char path[64];
    if (fd < 0) {
        fd = memfd_create("fuzz-input", 0);
        if (fd < 0)
            return NULL;
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    }
    if (ftruncate(fd, 0) != 0)
        return NULL;
    size_t done = 0;
    while (done < n) {
        ssize_t w = pwrite(fd, data + done, n - done, (off_t)done);
        if (w <= 0)
            return NULL;
        done += (size_t)w;
    }
    return path;
}

#endif
