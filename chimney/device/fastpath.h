/*
 * The C fast path's shared declarations: the structures Python and the four
 * compilation units (fastpath.c, toe.c, impair.c, wire.c) share, the functions Python
 * calls, and the few functions one unit calls in another.
 *
 * The part between "cdef: begin" and "cdef: end" is also the cffi cdef
 * (fastpath_build.py reads it), so a structure is declared once: keep it to
 * what cffi's parser takes (plain declarations, no macros but MAX_FRAME).
 */
#ifndef CHIMNEY_FASTPATH_H
#define CHIMNEY_FASTPATH_H

#include <stdint.h>

#include "hw.h"                 /* generated from chimney/hw.py */

/* Calls between units: not part of the module's interface. */
#define FP_INTERNAL __attribute__((visibility("hidden")))

/* cdef: begin */

/* The client's DMA mappings (chimney/device/dma.py fills them). */
struct dma_region {
    uint64_t iova;
    uint64_t len;
    uint8_t *host;
    uint32_t writable;
    uint32_t pad;
};

struct dma_table {
    uint32_t n;                 /* regions in r[], sorted by iova, disjoint */
    struct dma_region *r;
};

/* A descriptor ring, as the fast path sees it (chimney/device/nic.py owns it). */
struct fp_queue {
    uint64_t base;              /* ring bus address */
    uint32_t size;              /* entries, power of two */
    uint32_t head;              /* device's consumer index, free-running */
    uint32_t max_frame;         /* MTU + 18 */
    uint32_t error;             /* non-zero (a QSTOP_ code): stopped */
    uint32_t completed;         /* descriptors written back since last reset */
    uint32_t qid;
    uint64_t err_addr;          /* last DMA error address seen on this queue */
};

/* The TOE's offload table and input queue (toe.c; chimney/device/toe.py owns it). */
struct toe_slot {
    uint8_t lip[16];
    uint8_t rip[16];
    uint16_t lport, rport;      /* host byte order */
    uint32_t id;
    uint32_t used;
};

struct toe {
    uint32_t nslots;            /* power of two */
    uint32_t nused, ndead;
    struct toe_slot *slots;
    uint32_t rx_cap, rx_count;  /* input queue: frames waiting for Python */
    uint32_t *rx_id;
    uint32_t *rx_off;           /* TCP header's offset from the start of rx_buf */
    uint32_t *rx_len;           /* TCP bytes (header + payload) */
    uint8_t *rx_buf;            /* rx_cap * (MAX_FRAME + 64) bytes, frames packed
                                   (a super-segment takes many slots' worth) */
    uint16_t ip_id;             /* IPv4 identification: upper half of the range */
    uint16_t pad;
    uint32_t rx_used;           /* bytes of rx_buf in use (reset when rx_count is 0) */
};

/* One direction of an impaired link (impair.c; chimney/device/impair.py owns it). */
struct held_frame {
    uint64_t due;               /* CLOCK_MONOTONIC, microseconds */
    uint32_t seq;               /* arrival order: ties leave in order */
    uint32_t len;
    uint8_t data[MAX_FRAME];
};

struct impair {
    uint32_t loss_ppm;          /* parts per million */
    uint32_t reorder_ppm;
    uint64_t delay_us;
    uint64_t jitter_us;
    uint64_t rng;               /* xorshift64* state, never 0 */
    uint32_t cap, count, seq, pad;
    struct held_frame *line;
    uint64_t passed, lost, reordered, delayed, overflow;
};

/* fastpath.c: DMA, the plain-frame queues, the SIGBUS guard */
uint8_t *dma_ptr(const struct dma_table *t, uint64_t addr, uint64_t len, int write);
int dma_copy(const struct dma_table *t, uint64_t addr, uint8_t *buf, uint64_t len, int to_guest);
int fp_tx(const struct dma_table *t, struct fp_queue *q, uint32_t tail, int tap_fd,
          int pcap_fd, uint64_t *stats, uint8_t *scratch, int budget, struct impair *imp);
int fp_rx(const struct dma_table *t, struct fp_queue *q, uint32_t tail, int tap_fd,
          int pcap_fd, uint64_t *stats, uint8_t *scratch, const uint8_t *mac,
          int promisc, int budget, struct impair *imp, struct toe *toe);
int fp_impair_tx_flush(struct impair *im, int tap_fd);
int fp_wire_discard(int tap_fd, uint8_t *scratch, int budget);
int fp_impair_rx_flush(struct impair *im, const struct dma_table *t, struct fp_queue *q,
                       uint32_t tail, int pcap_fd, uint64_t *stats, const uint8_t *mac, int promisc,
                       struct toe *toe);
int fp_install_guard(void);
extern uint64_t fp_guard_faults;

/* wire.c */
int fp_wire_vnet(int fd, int on);

/* pcap.c: the wire capture (pcapng); a record's interface says who sent the
 * frame (PcapWriter writes one Interface Description Block for each) */
#define PCAP_IF_PEER 0
#define PCAP_IF_HOST 1
#define PCAP_IF_TOE 2
#define PCAP_MAX_FDS 8
int fp_pcap_open(int fd, uint32_t snaplen, int on);

/* impair.c */
uint64_t impair_now_us(void);
uint64_t impair_next_due(const struct impair *im);

/* toe.c */
int toe_add(struct toe *t, const char *lip, const char *rip, uint16_t lport, uint16_t rport,
            uint32_t id);
int toe_del(struct toe *t, const char *lip, const char *rip, uint16_t lport, uint16_t rport);
void toe_clear(struct toe *t);
int toe_xmit(struct toe *t, const char *dst_mac, const char *src_mac, int v6,
             const char *src_ip, const char *dst_ip, int ttl, int tos, uint32_t flow_label,
             const char *tcp, uint32_t hlen, const char *payload, uint32_t plen,
             int tap_fd, int pcap_fd, uint64_t *stats, uint8_t *scratch, struct impair *imp);
int toe_xmit_burst(struct toe *t, const char *dst_mac, const char *src_mac, int v6,
                   const char *src_ip, const char *dst_ip, int ttl, int tos, uint32_t flow_label,
                   const char *tcp, uint32_t hlen, const char *payload, uint32_t plen, uint32_t mss,
                   int tap_fd, int pcap_fd, uint64_t *stats, uint8_t *scratch, struct impair *imp);

/* cdef: end */

#include <sys/types.h>

/* The TOE input queue's buffer: rx_cap slots' worth of bytes, frames packed. */
#define TOE_RX_SLOT (MAX_FRAME + 64)
/* The largest frame the TAP hands over with offloads on: a 64 KB IP datagram. */
#define WIRE_RX_MAX (14 + 65535 + 64)

#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80

/* The legacy virtio-net header (10 bytes) in front of every frame on a TAP
 * opened with IFF_VNET_HDR; the host's byte order (little-endian here). */
struct vnet_hdr {
    uint8_t flags;              /* VNET_F_ */
    uint8_t gso_type;           /* VNET_GSO_, | VNET_GSO_ECN */
    uint16_t hdr_len;           /* Ethernet + IP + TCP headers */
    uint16_t gso_size;          /* payload bytes per segment (the MSS) */
    uint16_t csum_start;        /* where the partial checksum's sum starts */
    uint16_t csum_offset;       /* the checksum field, from csum_start */
};
#define VNET_F_NEEDS_CSUM 1
#define VNET_F_DATA_VALID 2
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define VNET_GSO_ECN 0x80

/* A TCP frame's layout: TCP header at l4, payload at hlen, IP datagram ends at end. */
struct tcp_frame {
    uint32_t l4, hlen, end;
    int v6;
};
typedef void (*seg_fn)(void *ctx, uint8_t *frame, uint32_t len);

/* wire.c */
FP_INTERNAL uint32_t csum_add(uint32_t sum, const uint8_t *p, uint32_t len);
FP_INTERNAL uint16_t csum_fold(uint32_t sum);
FP_INTERNAL uint32_t csum_add64(uint64_t acc, const uint8_t *p, uint32_t len);
FP_INTERNAL int wire_is_vnet(int fd);
FP_INTERNAL ssize_t wire_write(int fd, const uint8_t *frame, uint32_t len);
FP_INTERNAL int wire_write_gso(int fd, const struct vnet_hdr *vh, const uint8_t *hdrs, uint32_t hlen,
                               const uint8_t *payload, uint32_t plen);
FP_INTERNAL ssize_t wire_read(int fd, uint8_t *buf, uint32_t cap, struct vnet_hdr *vh);
FP_INTERNAL int tcp_frame_parse(const uint8_t *f, uint32_t n, struct tcp_frame *p);
FP_INTERNAL int gso_segment(const uint8_t *hdrs, const struct tcp_frame *p, const uint8_t *payload,
                            uint32_t plen, uint32_t mss, seg_fn fn, void *ctx);
FP_INTERNAL int csum_complete(uint8_t *f, uint32_t n, uint32_t start, uint32_t offset);
FP_INTERNAL void pcap_record_segments(int pcap_fd, int iface, const uint8_t *hdrs,
                                      const struct tcp_frame *p, const uint8_t *payload,
                                      uint32_t plen, uint32_t mss);

/* pcap.c: one Enhanced Packet Block; iface is a PCAP_IF_* */
FP_INTERNAL void pcap_record(int fd, int iface, const uint8_t *frame, uint32_t len);

/* impair.c: 0 lost, 1 goes now, 2 held in the delay line */
FP_INTERNAL int impair_admit(struct impair *im, const uint8_t *frame, uint32_t len);
FP_INTERNAL int impair_due(const struct impair *im, uint64_t now);
FP_INTERNAL void impair_remove(struct impair *im, int i);

/* toe.c: 1 the frame belongs to an offloaded connection (taken), 0 not; with
 * csum_ok the kernel vouched for its checksums (DATA_VALID / NEEDS_CSUM) */
FP_INTERNAL int toe_steer(struct toe *t, const uint8_t *f, uint32_t n, uint64_t *stats, int csum_ok);
/* toe.c: does the frame belong to an offloaded connection? */
FP_INTERNAL int toe_owns(const struct toe *t, const uint8_t *f, uint32_t n);
/* toe.c: bytes the input queue can still take in one frame */
FP_INTERNAL uint32_t toe_rx_room(const struct toe *t);

#endif
