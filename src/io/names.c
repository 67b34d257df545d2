/*
 * names.c - the name index of names.h: FNV-1a hash, linear probing.
 */
#include "io/names.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

int io_names_find(const io_names *ix, const char *name, io_name_of name_of, const void *arr, size_t *slot)
{
    if (!ix->n_slots)
        return -1;
    size_t m = ix->n_slots - 1, i = hash_str(name) & m;
    for (; ix->slots[i] >= 0; i = (i + 1) & m)
        if (!strcmp(name_of(arr, ix->slots[i]), name))
            break;
    if (slot)
        *slot = i;
    return ix->slots[i];
}

int io_names_rebuild(io_names *ix, size_t want, int n, io_name_of name_of, const void *arr)
{
    size_t ns = 64;
    while (ns < want * 2)
        ns *= 2;
    int *slots = malloc(ns * sizeof *slots);
    if (!slots)
        return -1;
    for (size_t i = 0; i < ns; i++)
        slots[i] = -1;
    for (int k = 0; k < n; k++) {
        size_t i = hash_str(name_of(arr, k)) & (ns - 1);
        while (slots[i] >= 0)
            i = (i + 1) & (ns - 1);
        slots[i] = k;
    }
    free(ix->slots);
    ix->slots = slots;
    ix->n_slots = ns;
    return 0;
}

void io_names_free(io_names *ix)
{
    free(ix->slots);
    ix->slots = NULL;
    ix->n_slots = 0;
}
