/*
 * The wire's segmentation offload, as a virtio NIC does it on a TAP: every
 * frame crosses the TAP fd behind a virtio-net header (IFF_VNET_HDR, legacy
 * 10-byte layout, chimney/device/wire.py opens it), so one write() can carry a
 * TCP super-segment of up to 64 KB that the host kernel cuts into MSS-sized
 * segments (TSO), and one read() can return the peer's segments whole (the
 * kernel's GSO/GRO), possibly with a checksum still to be completed.
 *
 * This unit keeps which fds carry the header, reads and writes through it,
 * cuts super-segments into MTU-sized frames in software (for the guest's RX
 * ring, the impaired link and the pcap) and holds the Internet checksum the
 * other units share.
 */
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fastpath.h"

/* -- the Internet checksum (RFC 1071) ---------------------------------------------- */

/* One's-complement sum, folded later. */
uint32_t csum_add(uint32_t sum, const uint8_t *p, uint32_t len)
{
    while (len >= 2) {
        sum += (uint32_t)p[0] << 8 | p[1];
        p += 2;
        len -= 2;
    }
    if (len)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

uint16_t csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* The one's-complement sum of p[0..len) as big-endian 16-bit words, folded to
 * 16 bits (not complemented).  Sums native 64-bit loads (the sum is byte-order
 * independent, RFC 1071 §2(B)) and swaps once at the end. */
static uint32_t csum_block(const uint8_t *p, uint32_t len)
{
    uint64_t acc = 0, v;
    uint32_t even = len & ~1u, i = 0;
    for (; i + 32 <= even; i += 32) {
        uint64_t a, b, c, d;
        memcpy(&a, p + i, 8); memcpy(&b, p + i + 8, 8);
        memcpy(&c, p + i + 16, 8); memcpy(&d, p + i + 24, 8);
        acc += (a & 0xffffffffu) + (a >> 32) + (b & 0xffffffffu) + (b >> 32)
             + (c & 0xffffffffu) + (c >> 32) + (d & 0xffffffffu) + (d >> 32);
    }
    for (; i + 8 <= even; i += 8) {
        memcpy(&v, p + i, 8);
        acc += (v & 0xffffffffu) + (v >> 32);
    }
    for (; i < even; i += 2) {
        uint16_t w;
        memcpy(&w, p + i, 2);
        acc += w;
    }
    while (acc >> 16)
        acc = (acc & 0xffff) + (acc >> 16);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    acc = ((acc & 0xff) << 8) | (acc >> 8);
#endif
    if (len & 1)
        acc += (uint32_t)p[len - 1] << 8;
    return (uint32_t)acc;
}

uint32_t csum_add64(uint64_t acc, const uint8_t *p, uint32_t len)
{
    if (len >= 64) {
        acc += csum_block(p, len);
        while (acc >> 32)
            acc = (acc & 0xffffffffu) + (acc >> 32);
        return (uint32_t)acc;
    }
    while (len >= 4) {
        acc += (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
        p += 4;
        len -= 4;
    }
    while (acc >> 32)
        acc = (acc & 0xffffffffu) + (acc >> 32);
    uint32_t s = (uint32_t)(acc & 0xffff) + (uint32_t)(acc >> 16);
    return csum_add(s, p, len);
}

/* -- which fds carry a virtio-net header ------------------------------------------------ */

#define WIRE_MAX_VNET_FDS 16
static int vnet_fds[WIRE_MAX_VNET_FDS];
static int n_vnet_fds;

/* Mark (on) or unmark fd as a TAP opened with IFF_VNET_HDR.  0, or -1 if the table is full. */
int fp_wire_vnet(int fd, int on)
{
    for (int i = 0; i < n_vnet_fds; i++)
        if (vnet_fds[i] == fd) {
            if (!on)
                vnet_fds[i] = vnet_fds[--n_vnet_fds];
            return 0;
        }
    if (!on)
        return 0;
    if (n_vnet_fds >= WIRE_MAX_VNET_FDS)
        return -1;
    vnet_fds[n_vnet_fds++] = fd;
    return 0;
}

int wire_is_vnet(int fd)
{
    for (int i = 0; i < n_vnet_fds; i++)
        if (vnet_fds[i] == fd)
            return 1;
    return 0;
}

/* -- reading and writing ---------------------------------------------------------------- */

/* Write one frame (no offload asked for: a zeroed header).  Returns the frame
 * bytes written, or -1. */
ssize_t wire_write(int fd, const uint8_t *frame, uint32_t len)
{
    static const struct vnet_hdr none;
    struct iovec iov[2];
    ssize_t w;
    if (fd < 0)
        return -1;
    if (!wire_is_vnet(fd))
        return write(fd, frame, len);
    iov[0].iov_base = (void *)&none;
    iov[0].iov_len = sizeof(none);
    iov[1].iov_base = (void *)frame;
    iov[1].iov_len = len;
    w = writev(fd, iov, 2);
    return w < (ssize_t)sizeof(none) ? -1 : w - (ssize_t)sizeof(none);
}

/* Write a super-segment: headers, then payload, behind `vh`.  0, or -1. */
int wire_write_gso(int fd, const struct vnet_hdr *vh, const uint8_t *hdrs, uint32_t hlen,
                   const uint8_t *payload, uint32_t plen)
{
    struct iovec iov[3];
    iov[0].iov_base = (void *)vh;
    iov[0].iov_len = sizeof(*vh);
    iov[1].iov_base = (void *)hdrs;
    iov[1].iov_len = hlen;
    iov[2].iov_base = (void *)payload;
    iov[2].iov_len = plen;
    return writev(fd, iov, plen ? 3 : 2) == (ssize_t)(sizeof(*vh) + hlen + plen) ? 0 : -1;
}

/* Read one frame into buf (cap bytes) and its header into vh (zeroed on a
 * plain TAP).  Frame bytes, 0 when there is nothing to read, -1 on a runt. */
ssize_t wire_read(int fd, uint8_t *buf, uint32_t cap, struct vnet_hdr *vh)
{
    ssize_t n;
    memset(vh, 0, sizeof(*vh));
    for (;;) {
        if (wire_is_vnet(fd)) {
            struct iovec iov[2] = {{vh, sizeof(*vh)}, {buf, cap}};
            n = readv(fd, iov, 2);
            if (n > 0 && n < (ssize_t)sizeof(*vh))
                return -1;
            if (n > 0)
                n -= (ssize_t)sizeof(*vh);
        } else {
            n = read(fd, buf, cap);
        }
        if (n >= 0)
            return n;
        if (errno != EINTR)
            return 0;           /* EAGAIN: drained */
    }
}

/* -- TCP frames ------------------------------------------------------------------------- */

/* Where a TCP frame's headers are: IPv4 (options allowed, not a fragment) or
 * IPv6 without extension headers; `end` is where the IP datagram ends (the
 * frame may be padded).  0, or -1 if it is not such a frame. */
int tcp_frame_parse(const uint8_t *f, uint32_t n, struct tcp_frame *p)
{
    uint32_t l4, end;
    if (n < 14 + 20 + 20)
        return -1;
    if (f[12] == 0x08 && f[13] == 0x00) {
        const uint8_t *ip = f + 14;
        uint32_t ihl = (ip[0] & 0x0f) * 4u, tot = (uint32_t)(ip[2] << 8 | ip[3]);
        if ((ip[0] >> 4) != 4 || ihl < 20 || ip[9] != 6 || (ip[6] & 0x3f) || ip[7])
            return -1;
        l4 = 14 + ihl;
        end = 14 + tot;
        p->v6 = 0;
    } else if (f[12] == 0x86 && f[13] == 0xDD) {
        const uint8_t *ip = f + 14;
        if ((ip[0] >> 4) != 6 || ip[6] != 6)
            return -1;
        l4 = 14 + 40;
        end = l4 + (uint32_t)(ip[4] << 8 | ip[5]);
        p->v6 = 1;
    } else {
        return -1;
    }
    if (end > n || l4 + 20 > end)
        return -1;
    p->l4 = l4;
    p->hlen = l4 + (f[l4 + 12] >> 4) * 4u;
    p->end = end;
    if (p->hlen < l4 + 20 || p->hlen > end)
        return -1;
    return 0;
}

/* The TCP checksum of a whole frame, written into it. */
static void tcp_csum_fill(uint8_t *f, const struct tcp_frame *p)
{
    uint32_t tcplen = p->end - p->l4, sum;
    uint8_t *th = f + p->l4;
    sum = p->v6 ? csum_add(0, f + 14 + 8, 32) : csum_add(0, f + 14 + 12, 8);
    sum += 6 + tcplen;
    th[16] = th[17] = 0;
    uint16_t c = csum_fold(csum_add64(sum, th, tcplen));
    th[16] = (uint8_t)(c >> 8);
    th[17] = (uint8_t)c;
}

static uint8_t seg_buf[MAX_FRAME];

/*
 * Cut a TCP super-segment into segments of `mss` payload bytes, each complete
 * (IP length, IPv4 identification + i and header checksum, sequence number,
 * TCP checksum), as the kernel's GSO does: FIN and PSH only on the last, CWR
 * only on the first.  hdrs[0..p->hlen) are the headers (their lengths and
 * checksums are ignored), payload the data.  Each segment goes to fn (the
 * buffer is reused: fn copies what it keeps).  Returns the segments made, or
 * -1 if one would not fit in a frame.
 */
int gso_segment(const uint8_t *hdrs, const struct tcp_frame *p, const uint8_t *payload,
                uint32_t plen, uint32_t mss, seg_fn fn, void *ctx)
{
    uint32_t hl = p->hlen, off = 0, seq0;
    uint16_t id0 = 0;
    uint8_t flags0;
    int n = 0;
    if (!mss || hl + (plen < mss ? plen : mss) > MAX_FRAME)
        return -1;
    seq0 = (uint32_t)hdrs[p->l4 + 4] << 24 | (uint32_t)hdrs[p->l4 + 5] << 16
         | (uint32_t)hdrs[p->l4 + 6] << 8 | hdrs[p->l4 + 7];
    flags0 = hdrs[p->l4 + 13];
    if (!p->v6)
        id0 = (uint16_t)(hdrs[14 + 4] << 8 | hdrs[14 + 5]);
    do {
        uint32_t len = plen - off < mss ? plen - off : mss, seq = seq0 + off;
        uint8_t *f = seg_buf, *ip = seg_buf + 14, *th = seg_buf + p->l4;
        struct tcp_frame sp = *p;
        memcpy(f, hdrs, hl);
        memcpy(f + hl, payload + off, len);
        sp.end = hl + len;
        if (p->v6) {
            uint32_t pl = sp.end - 14 - 40;
            ip[4] = (uint8_t)(pl >> 8);
            ip[5] = (uint8_t)pl;
        } else {
            uint32_t tot = sp.end - 14, ihl = p->l4 - 14;
            uint16_t id = (uint16_t)(id0 + n);
            ip[2] = (uint8_t)(tot >> 8);
            ip[3] = (uint8_t)tot;
            ip[4] = (uint8_t)(id >> 8);
            ip[5] = (uint8_t)id;
            ip[10] = ip[11] = 0;
            uint16_t c = csum_fold(csum_add(0, ip, ihl));
            ip[10] = (uint8_t)(c >> 8);
            ip[11] = (uint8_t)c;
        }
        th[4] = (uint8_t)(seq >> 24); th[5] = (uint8_t)(seq >> 16);
        th[6] = (uint8_t)(seq >> 8); th[7] = (uint8_t)seq;
        th[13] = flags0;
        if (off + len < plen)
            th[13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
        if (n)
            th[13] &= (uint8_t)~TCP_CWR;
        tcp_csum_fill(f, &sp);
        fn(ctx, f, sp.end);
        off += len;
        n++;
    } while (off < plen);
    return n;
}

/* Complete a partial checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM): the field at
 * start + offset holds the pseudo-header sum; the sum from start to the end
 * of the frame goes there.  0, or -1 if the offsets lie outside the frame. */
int csum_complete(uint8_t *f, uint32_t n, uint32_t start, uint32_t offset)
{
    if (start >= n || offset > n - start || n - start - offset < 2)
        return -1;
    uint16_t c = csum_fold(csum_add64(0, f + start, n - start));
    if (c == 0 && offset == 6)
        c = 0xffff;             /* UDP: 0 means "no checksum" */
    f[start + offset] = (uint8_t)(c >> 8);
    f[start + offset + 1] = (uint8_t)c;
    return 0;
}

struct pcap_dest { int fd, iface; };

static void pcap_seg(void *ctx, uint8_t *frame, uint32_t len)
{
    const struct pcap_dest *d = ctx;
    pcap_record(d->fd, d->iface, frame, len);
}

/* Record a super-segment in the pcap as the segments the wire carries. */
void pcap_record_segments(int pcap_fd, int iface, const uint8_t *hdrs, const struct tcp_frame *p,
                          const uint8_t *payload, uint32_t plen, uint32_t mss)
{
    struct pcap_dest d = {pcap_fd, iface};
    if (pcap_fd >= 0)
        gso_segment(hdrs, p, payload, plen, mss, pcap_seg, &d);
}
