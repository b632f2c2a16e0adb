/* Steps the wall clock (CLOCK_REALTIME) of a process by the seconds in the file $WALL_CLOCK_OFFSET_FILE, as an NTP
   step does; every other clock (CLOCK_MONOTONIC, the one durations use) is left alone. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);

static long offset_seconds(void) {
    const char *path = getenv("WALL_CLOCK_OFFSET_FILE");
    long offset = 0;
    FILE *file = path ? fopen(path, "r") : NULL;
    if (file) {
        if (fscanf(file, "%ld", &offset) != 1) offset = 0;
        fclose(file);
    }
    return offset;
}

int clock_gettime(clockid_t clock, struct timespec *now) {
    if (!real_clock_gettime) real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    int result = real_clock_gettime(clock, now);
    if (result == 0 && clock == CLOCK_REALTIME) now->tv_sec += offset_seconds();
    return result;
}

int gettimeofday(struct timeval *now, void *zone) {
    struct timespec spec;
    int result = clock_gettime(CLOCK_REALTIME, &spec);
    if (result == 0 && now) {
        now->tv_sec = spec.tv_sec;
        now->tv_usec = spec.tv_nsec / 1000;
    }
    (void)zone;
    return result;
}
