/*
 * version.c - the library's version, for a program to compare with the
 * TANDEM_VERSION it was built against (tandem.h says what stays compatible).
 */
#include "tandem.h"

const char *tandem_version(void) { return TANDEM_VERSION; }
int tandem_version_number(void) { return TANDEM_VERSION_NUMBER; }
