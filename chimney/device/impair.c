/*
 * Wire impairment: netem's delay, jitter, loss and reordering, on the NIC's
 * port, in the device.  Test hosts here have no sch_netem, and the chimney
 * NIC's traffic never crosses a guest qdisc, so the link's misbehaviour is
 * emulated where the frames are: one impairment per direction, seeded, so a
 * run can be repeated frame for frame.
 *
 * Semantics follow netem: a lost frame is gone; a delayed frame leaves after
 * delay +- jitter; with reordering, that fraction of frames skips the delay
 * and overtakes the ones held back.  The delay line is bounded (limit); a
 * frame that finds it full is lost, as netem's limit drops.
 */

#include <string.h>
#include <time.h>

#include "fastpath.h"    /* struct impair, struct held_frame */

uint64_t impair_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static uint64_t rng_next(struct impair *im)
{
    uint64_t x = im->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    im->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static int chance(struct impair *im, uint32_t ppm)
{
    return ppm && (uint32_t)(rng_next(im) % 1000000u) < ppm;
}

/* 0: lost, 1: goes now, 2: held in the delay line. */
int impair_admit(struct impair *im, const uint8_t *frame, uint32_t len)
{
    uint64_t d;
    struct held_frame *h;
    if (chance(im, im->loss_ppm)) {
        im->lost++;
        return 0;
    }
    if (!im->delay_us && !im->jitter_us) {
        im->passed++;
        return 1;
    }
    if (chance(im, im->reorder_ppm)) {
        im->reordered++;
        im->passed++;
        return 1;
    }
    if (im->count >= im->cap) {
        im->overflow++;
        im->lost++;
        return 0;
    }
    d = im->delay_us;
    if (im->jitter_us) {
        uint64_t span = 2 * im->jitter_us + 1, j = rng_next(im) % span;
        d = d + j >= im->jitter_us ? d + j - im->jitter_us : 0;
    }
    h = &im->line[im->count++];
    h->due = impair_now_us() + d;
    h->seq = im->seq++;
    h->len = len;
    memcpy(h->data, frame, len);
    im->delayed++;
    return 2;
}

/* Index of the earliest frame due by `now` (ties in arrival order), or -1. */
int impair_due(const struct impair *im, uint64_t now)
{
    int best = -1;
    for (uint32_t i = 0; i < im->count; i++) {
        const struct held_frame *h = &im->line[i];
        if (h->due > now)
            continue;
        if (best < 0 || h->due < im->line[best].due ||
            (h->due == im->line[best].due && (int32_t)(h->seq - im->line[best].seq) < 0))
            best = (int)i;
    }
    return best;
}

void impair_remove(struct impair *im, int i)
{
    im->count--;
    if ((uint32_t)i != im->count)
        memcpy(&im->line[i], &im->line[im->count], sizeof(im->line[0]));
}

/* When the next held frame is due (microseconds), or 0 when none is held. */
uint64_t impair_next_due(const struct impair *im)
{
    uint64_t best = 0;
    for (uint32_t i = 0; i < im->count; i++)
        if (!best || im->line[i].due < best)
            best = im->line[i].due;
    return best;
}
