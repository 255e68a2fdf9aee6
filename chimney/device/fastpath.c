/*
 * chimney device fast path: per-frame and per-byte work of the plain-frame
 * NIC.  Control logic (registers, queue set-up, interrupts) stays in Python;
 * this file moves frames between descriptor rings in guest memory and the
 * wire (TAP fd, through wire.c: with the virtio-net header, super-segments
 * from the kernel are cut to MTU-sized frames here), and writes pcap records.
 *
 * Every guest address goes through the DMA table: an address outside every
 * mapping is a DMA error, never a host memory access.
 */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fastpath.h"   /* shared structures; hw.h: layouts, flags, stat indices */

static const struct dma_region *find_region(const struct dma_table *t, uint64_t addr)
{
    uint32_t lo = 0, hi = t->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        const struct dma_region *r = &t->r[mid];
        if (addr < r->iova)
            hi = mid;
        else if (addr - r->iova >= r->len)
            lo = mid + 1;
        else
            return r;
    }
    return NULL;
}

/* Host pointer for [addr, addr+len) if it lies inside one mapping. */
uint8_t *dma_ptr(const struct dma_table *t, uint64_t addr, uint64_t len, int write)
{
    const struct dma_region *r = find_region(t, addr);
    if (!r || len > r->len - (addr - r->iova) || (write && !r->writable))
        return NULL;
    return r->host + (addr - r->iova);
}

/* Copy between guest memory and a host buffer; may cross adjacent mappings.
 * Returns 0, or -1 (nothing is promised about a partial copy). */
static int dma_copy_inner(const struct dma_table *t, uint64_t addr, uint8_t *buf, uint64_t len, int to_guest)
{
    while (len) {
        const struct dma_region *r = find_region(t, addr);
        if (!r || (to_guest && !r->writable))
            return -1;
        uint64_t off = addr - r->iova, n = r->len - off;
        if (n > len)
            n = len;
        if (to_guest)
            memcpy(r->host + off, buf, n);
        else
            memcpy(buf, r->host + off, n);
        addr += n;
        buf += n;
        len -= n;
        if (len && addr == 0)
            return -1;          /* wrapped past 2^64 */
    }
    return 0;
}

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
/* A descriptor's status word: one aligned 16-bit store, ordered after every store
 * before it (buffer, length, flags), so a driver that loads it first and sees DD
 * then finds the rest complete. */
static inline void st16_release(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELEASE);
}

static uint8_t *ring_desc(const struct dma_table *t, struct fp_queue *q, uint32_t idx,
                          uint64_t *stats)
{
    uint64_t a = q->base + (uint64_t)(idx & (q->size - 1)) * TXDESC_SIZE;
    uint8_t *d = dma_ptr(t, a, TXDESC_SIZE, 1);
    if (!d) {
        q->error = QSTOP_RING_DMA;
        q->err_addr = a;
        stats[STAT_DMA_ERRORS]++;
    }
    return d;
}

/*
 * Transmit: send every complete frame between head and the driver's tail.
 * Returns frames handled (sent or dropped), or -1 if the queue was stopped.
 */
static int fp_tx_inner(const struct dma_table *t, struct fp_queue *q, uint32_t tail, int tap_fd,
          int pcap_fd, uint64_t *stats, uint8_t *scratch, int budget, struct impair *imp)
{
    int frames = 0;
    if (q->error)
        return -1;
    if ((uint32_t)(tail - q->head) > q->size) {
        q->error = QSTOP_BAD_INDEX;   /* producer index ran past the ring */
        return -1;
    }
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    while (q->head != tail && frames < budget) {
        uint32_t i = q->head, flen = 0;
        uint16_t bad = 0;
        int eop = 0;
        /* First pass: find the frame's end without consuming anything. */
        while (i != tail) {
            uint8_t *d = ring_desc(t, q, i, stats);
            if (!d)
                return -1;
            i++;
            if (ld16(d + TXDESC_FLAGS) & TXF_EOP) {
                eop = 1;
                break;
            }
        }
        if (!eop) {
            if ((uint32_t)(tail - q->head) < q->size)
                break;          /* rest of the frame not posted yet */
            bad = DESC_LEN_ERR; /* a whole ring without EOP */
        }
        /* Second pass: gather, then write back status. */
        for (uint32_t j = q->head; j != i; j++) {
            uint8_t *d = ring_desc(t, q, j, stats);
            if (!d)
                return -1;
            uint64_t addr = ld64(d + TXDESC_ADDR);
            uint16_t len = ld16(d + TXDESC_LEN);
            if (bad)
                continue;
            if (len == 0 || flen + len > q->max_frame) {
                bad = DESC_LEN_ERR;
                stats[STAT_DESC_ERRORS]++;
            } else if (dma_copy_inner(t, addr, scratch + flen, len, 0)) {
                bad = DESC_DMA_ERR;
                q->err_addr = addr;
                stats[STAT_DMA_ERRORS]++;
            } else {
                flen += len;
            }
        }
        if (!bad && flen < 14) {
            bad = DESC_LEN_ERR;
            stats[STAT_DESC_ERRORS]++;
        }
        if (!bad) {
            /* An impaired link may lose or hold the frame: the NIC sent it all the same. */
            int go = imp && tap_fd >= 0 ? impair_admit(imp, scratch, flen) : 1;
            ssize_t w = go != 1 ? (ssize_t)flen
                      : wire_write(tap_fd, scratch, flen);  /* no wire (-1): dropped */
            if (w == (ssize_t)flen) {
                stats[STAT_TX_FRAMES]++;
                stats[STAT_TX_BYTES] += flen;
                pcap_record(pcap_fd, PCAP_IF_HOST, scratch, flen);
            } else {
                stats[STAT_TX_DROPS]++;
            }
        } else {
            stats[STAT_TX_DROPS]++;
        }
        for (uint32_t j = q->head; j != i; j++) {
            uint8_t *d = ring_desc(t, q, j, stats);
            if (!d)
                return -1;
            st16_release(d + TXDESC_STATUS, DESC_DD | bad);   /* after its buffer was read */
            q->completed++;
        }
        q->head = i;
        frames++;
    }
    return frames;
}

/*
 * Deliver one frame into the RX ring.  Returns 1 delivered, 0 dropped (no
 * buffer or too long), -1 if the queue was stopped.
 */
static int fp_rx_deliver(const struct dma_table *t, struct fp_queue *q, uint32_t tail,
                  const uint8_t *frame, uint32_t flen, uint64_t *stats)
{
    uint32_t avail, i, need = 0, ndesc = 0;
    if (q->error)
        return -1;
    avail = tail - q->head;
    if (avail > q->size) {
        q->error = QSTOP_BAD_INDEX;
        return -1;
    }
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    /* How many posted buffers does the frame need? */
    for (i = q->head; i != tail && need < flen; i++, ndesc++) {
        uint8_t *d = ring_desc(t, q, i, stats);
        if (!d)
            return -1;
        need += ld16(d + RXDESC_BUFLEN);
    }
    if (need < flen) {
        if (avail == q->size && avail > 0)
            stats[STAT_RX_DROPS]++;         /* can never fit */
        else
            stats[STAT_RX_NO_BUFFER]++;
        return 0;
    }
    uint32_t off = 0;
    int lost = 0;
    for (i = 0; i < ndesc; i++) {
        uint8_t *d = ring_desc(t, q, q->head, stats);
        if (!d)
            return -1;
        uint64_t addr = ld64(d + RXDESC_ADDR);
        uint32_t n = ld16(d + RXDESC_BUFLEN);
        uint16_t status = DESC_DD;
        if (n > flen - off)
            n = flen - off;
        if (dma_copy_inner(t, addr, (uint8_t *)frame + off, n, 1)) {
            status |= DESC_DMA_ERR;
            q->err_addr = addr;
            stats[STAT_DMA_ERRORS]++;
            lost = 1;
        }
        off += n;
        st16(d + RXDESC_LEN, (uint16_t)n);
        st16(d + RXDESC_FLAGS, i == ndesc - 1 ? RXF_EOP : 0);
        st16_release(d + RXDESC_STATUS, status);    /* last: data, length, flags first */
        q->head++;
        q->completed++;
    }
    if (lost) {
        stats[STAT_RX_DROPS]++;             /* part of it never reached the guest */
    } else {
        stats[STAT_RX_FRAMES]++;
        stats[STAT_RX_BYTES] += flen;
    }
    return 1;
}

/* A frame reaches the NIC's port: record it, filter it, deliver it.  csum_ok:
 * the kernel vouched for its checksums. */
static void rx_arrive(const struct dma_table *t, struct fp_queue *q, uint32_t tail, int pcap_fd,
                      uint64_t *stats, const uint8_t *frame, uint32_t n, const uint8_t *mac, int promisc,
                      struct toe *toe, int csum_ok)
{
    pcap_record(pcap_fd, PCAP_IF_PEER, frame, n);
    if (n < 14 || (q && n > q->max_frame)) {
        stats[STAT_RX_DROPS]++;
        return;
    }
    if (!promisc && !(frame[0] & 1) && memcmp(frame, mac, 6) != 0) {
        stats[STAT_RX_FILTERED]++;
        return;
    }
    /* TCP of an offloaded connection goes to the TOE, not the RX ring */
    if (toe && memcmp(frame, mac, 6) == 0 && toe_steer(toe, frame, n, stats, csum_ok))
        return;
    if (!q || q->error) {
        stats[STAT_RX_NO_BUFFER]++;
        return;
    }
    fp_rx_deliver(t, q, tail, frame, n, stats);
}

/* Where the segments of a received super-segment go. */
struct rx_port {
    const struct dma_table *t;
    struct fp_queue *q;
    uint32_t tail;
    int pcap_fd;
    uint64_t *stats;
    const uint8_t *mac;
    int promisc;
    struct impair *imp;
    struct toe *toe;
};

static void rx_segment(void *ctx, uint8_t *frame, uint32_t len)
{
    struct rx_port *p = ctx;
    p->stats[STAT_WIRE_SEGMENTED]++;
    if (p->imp && impair_admit(p->imp, frame, len) != 1)
        return;                 /* lost on the link, or still on its way */
    rx_arrive(p->t, p->q, p->tail, p->pcap_fd, p->stats, frame, len, p->mac, p->promisc, p->toe, 1);
}

/*
 * A TCP super-segment from the kernel (gso_type TCPV4/TCPV6).  To an
 * offloaded connection on a clean link it goes to the TOE whole (the pcap
 * gets the segments the wire would have carried); otherwise it is cut into
 * MSS-sized frames with their checksums, each then arriving as any frame
 * does (impairment, pcap, filter, TOE or RX ring).
 */
static void rx_super(struct rx_port *p, uint8_t *f, uint32_t n, const struct vnet_hdr *vh)
{
    struct tcp_frame tf;
    uint8_t gt = vh->gso_type & (uint8_t)~VNET_GSO_ECN;
    p->stats[STAT_WIRE_GSO_IN]++;
    if ((gt != VNET_GSO_TCPV4 && gt != VNET_GSO_TCPV6) || tcp_frame_parse(f, n, &tf)
        || tf.v6 != (gt == VNET_GSO_TCPV6) || !vh->gso_size
        || tf.hlen + vh->gso_size > MAX_FRAME) {
        p->stats[STAT_RX_DROPS]++;     /* not a super-segment we can cut */
        return;
    }
    if (!p->imp && p->toe && memcmp(f, p->mac, 6) == 0 && toe_owns(p->toe, f, n)) {
        pcap_record_segments(p->pcap_fd, PCAP_IF_PEER, f, &tf, f + tf.hlen, tf.end - tf.hlen, vh->gso_size);
        toe_steer(p->toe, f, n, p->stats, 1);
        return;
    }
    gso_segment(f, &tf, f + tf.hlen, tf.end - tf.hlen, vh->gso_size, rx_segment, p);
}

/* The TAP's frames land here with offloads on: one 64 KB datagram fits. */
static uint8_t wire_rxbuf[WIRE_RX_MAX];

/*
 * Read frames from the wire and deliver them.  rxq may be NULL (device not
 * enabled): frames are then read and counted as dropped, so the wire never
 * backs up into a busy loop.  Reading stops while the TOE's input queue could
 * not take one more frame (the rest waits in the TAP's queue).  Returns frames
 * read.
 */
static int fp_rx_inner(const struct dma_table *t, struct fp_queue *q, uint32_t tail, int tap_fd,
          int pcap_fd, uint64_t *stats, uint8_t *scratch, const uint8_t *mac,
          int promisc, int budget, struct impair *imp, struct toe *toe)
{
    struct rx_port port = {t, q, tail, pcap_fd, stats, mac, promisc, imp, toe};
    int vnet = wire_is_vnet(tap_fd), frames = 0;
    uint8_t *buf = vnet ? wire_rxbuf : scratch;
    uint32_t cap = vnet ? sizeof(wire_rxbuf) : MAX_FRAME + 64;
    while (frames < budget) {
        struct vnet_hdr vh;
        if (toe && toe->nused && toe_rx_room(toe) < cap)
            break;
        ssize_t n = wire_read(tap_fd, buf, cap, &vh);
        if (n == 0)
            break;              /* drained */
        frames++;
        if (n < 0) {
            stats[STAT_RX_DROPS]++;     /* shorter than its header */
            continue;
        }
        if (vh.gso_type != VNET_GSO_NONE) {
            rx_super(&port, buf, (uint32_t)n, &vh);
            continue;
        }
        int csum_ok = (vh.flags & VNET_F_DATA_VALID) != 0;
        if (vh.flags & VNET_F_NEEDS_CSUM) {
            if (csum_complete(buf, (uint32_t)n, vh.csum_start, vh.csum_offset)) {
                stats[STAT_RX_DROPS]++;
                continue;
            }
            stats[STAT_WIRE_CSUM_COMPLETED]++;
            csum_ok = 1;
        }
        if (imp && (n > MAX_FRAME || impair_admit(imp, buf, (uint32_t)n) != 1))
            continue;           /* lost on the link, or still on its way */
        rx_arrive(t, q, tail, pcap_fd, stats, buf, (uint32_t)n, mac, promisc, toe, csum_ok);
    }
    return frames;
}

/* The link is down: frames reaching the port are lost before the MAC (no pcap,
 * no RX ring, no TOE).  Returns frames read and dropped, at most budget. */
int fp_wire_discard(int tap_fd, uint8_t *scratch, int budget)
{
    int frames = 0;
    while (frames < budget) {
        ssize_t n = read(tap_fd, scratch, MAX_FRAME + 64);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;              /* EAGAIN: wire drained */
        }
        if (n == 0)
            break;
        frames++;
    }
    return frames;
}

/* Frames the impaired link releases now: out to the TAP. */
int fp_impair_tx_flush(struct impair *im, int tap_fd)
{
    uint64_t now = impair_now_us();
    int i, n = 0;
    while ((i = impair_due(im, now)) >= 0) {
        (void)wire_write(tap_fd, im->line[i].data, im->line[i].len);
        impair_remove(im, i);
        n++;
    }
    return n;
}

static int impair_rx_flush_inner(struct impair *im, const struct dma_table *t, struct fp_queue *q,
                                 uint32_t tail, int pcap_fd, uint64_t *stats, const uint8_t *mac,
                                 int promisc, struct toe *toe)
{
    uint64_t now = impair_now_us();
    int i, n = 0;
    while ((i = impair_due(im, now)) >= 0) {
        rx_arrive(t, q, tail, pcap_fd, stats, im->line[i].data, im->line[i].len, mac, promisc, toe, 0);
        impair_remove(im, i);
        n++;
    }
    return n;
}

/*
 * SIGBUS guard.  Guest RAM is a file the client owns: if it shrinks the file
 * after DMA_MAP, touching the now-missing pages raises SIGBUS.  Every entry
 * point that touches guest memory runs under the guard; a fault there turns
 * into a DMA error instead of killing the device.  Faults elsewhere go to the
 * previous handler.
 */
static sigjmp_buf guard_jmp;
static volatile sig_atomic_t guard_on;
static struct sigaction prev_bus;
static int guard_installed;
uint64_t fp_guard_faults;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    if (guard_on) {
        guard_on = 0;
        siglongjmp(guard_jmp, 1);
    }
    sigaction(SIGBUS, &prev_bus, NULL);
    (void)si;
    (void)uc;
    raise(sig);
}

int fp_install_guard(void)
{
    struct sigaction sa;
    if (guard_installed)
        return 0;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &prev_bus))
        return -1;
    guard_installed = 1;
    return 0;
}

int dma_copy(const struct dma_table *t, uint64_t addr, uint8_t *buf, uint64_t len, int to_guest)
{
    int r;
    if (sigsetjmp(guard_jmp, 1)) {
        fp_guard_faults++;
        return -1;
    }
    guard_on = 1;
    r = dma_copy_inner(t, addr, buf, len, to_guest);
    guard_on = 0;
    return r;
}

/* Run `call` (returning int) under the guard: a fault counts a DMA error,
 * stops the queue and returns fault_rc instead. */
#define RETURN_GUARDED(q, stats, fault_rc, call)  \
    do {                                          \
        int r_;                                   \
        if (sigsetjmp(guard_jmp, 1)) {            \
            fp_guard_faults++;                    \
            (stats)[STAT_DMA_ERRORS]++;           \
            if (q)                                \
                (q)->error = QSTOP_FAULT;         \
            return (fault_rc);                    \
        }                                         \
        guard_on = 1;                             \
        r_ = (call);                              \
        guard_on = 0;                             \
        return r_;                                \
    } while (0)

int fp_tx(const struct dma_table *t, struct fp_queue *q, uint32_t tail, int tap_fd,
          int pcap_fd, uint64_t *stats, uint8_t *scratch, int budget, struct impair *imp)
{
    RETURN_GUARDED(q, stats, -1, fp_tx_inner(t, q, tail, tap_fd, pcap_fd, stats, scratch, budget, imp));
}

int fp_rx(const struct dma_table *t, struct fp_queue *q, uint32_t tail, int tap_fd,
          int pcap_fd, uint64_t *stats, uint8_t *scratch, const uint8_t *mac,
          int promisc, int budget, struct impair *imp, struct toe *toe)
{
    RETURN_GUARDED(q, stats, 0, fp_rx_inner(t, q, tail, tap_fd, pcap_fd, stats, scratch, mac,
                                            promisc, budget, imp, toe));
}

int fp_impair_rx_flush(struct impair *im, const struct dma_table *t, struct fp_queue *q,
                       uint32_t tail, int pcap_fd, uint64_t *stats, const uint8_t *mac, int promisc,
                       struct toe *toe)
{
    RETURN_GUARDED(q, stats, 0, impair_rx_flush_inner(im, t, q, tail, pcap_fd, stats, mac, promisc, toe));
}
