/*
 * TOE fast path (TCP chimney offload): the per-segment and per-byte work of
 * offloaded connections.  The TCP state machine (chimney.tcp.engine) and the
 * offload control logic stay in Python (chimney/device/toe.py); this file
 *   - keeps the offload table (4-tuple -> connection id), maintained from Python,
 *   - steers received TCP frames of offloaded connections away from the RX
 *     ring into the TOE's input queue, after verifying their checksums,
 *   - builds outgoing frames (Ethernet + IPv4/IPv6 with DF + TCP with its
 *     checksum) and writes them to the wire, the pcap and the impairment.
 * Its structures are in fastpath.h; it is one compilation unit of the cffi module.
 */
#include <string.h>
#include <unistd.h>

#include "fastpath.h"

#define TOE_SLOT_EMPTY 0
#define TOE_SLOT_USED 1
#define TOE_SLOT_DEAD 2
#define TOE_RX_SLOT (MAX_FRAME + 64)

static uint32_t toe_hash(const uint8_t *lip, const uint8_t *rip, uint16_t lport, uint16_t rport)
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < 16; i++)
        h = (h ^ lip[i]) * 16777619u;
    for (int i = 0; i < 16; i++)
        h = (h ^ rip[i]) * 16777619u;
    h = (h ^ lport) * 16777619u;
    h = (h ^ rport) * 16777619u;
    return h ^ (h >> 15);
}

static int toe_match(const struct toe_slot *s, const uint8_t *lip, const uint8_t *rip,
                     uint16_t lport, uint16_t rport)
{
    return s->used == TOE_SLOT_USED && s->lport == lport && s->rport == rport
        && !memcmp(s->lip, lip, 16) && !memcmp(s->rip, rip, 16);
}

/* Connection id for a 4-tuple, or 0. */
static uint32_t toe_lookup(const struct toe *t, const uint8_t *lip, const uint8_t *rip,
                    uint16_t lport, uint16_t rport)
{
    uint32_t m = t->nslots - 1, i;
    if (!t->nused)
        return 0;
    i = toe_hash(lip, rip, lport, rport) & m;
    for (uint32_t n = 0; n < t->nslots; n++, i = (i + 1) & m) {
        const struct toe_slot *s = &t->slots[i];
        if (s->used == TOE_SLOT_EMPTY)
            return 0;
        if (toe_match(s, lip, rip, lport, rport))
            return s->id;
    }
    return 0;
}

/* 0 added, -1 table full (Python keeps nused well below nslots). */
int toe_add(struct toe *t, const char *lip, const char *rip, uint16_t lport, uint16_t rport,
            uint32_t id)
{
    uint32_t m = t->nslots - 1, i;
    if (t->nused + t->ndead + 1 >= t->nslots)
        return -1;
    i = toe_hash((const uint8_t *)lip, (const uint8_t *)rip, lport, rport) & m;
    for (;; i = (i + 1) & m) {
        struct toe_slot *s = &t->slots[i];
        if (s->used != TOE_SLOT_USED) {
            if (s->used == TOE_SLOT_DEAD)
                t->ndead--;
            memcpy(s->lip, lip, 16);
            memcpy(s->rip, rip, 16);
            s->lport = lport;
            s->rport = rport;
            s->id = id;
            s->used = TOE_SLOT_USED;
            t->nused++;
            return 0;
        }
    }
}

int toe_del(struct toe *t, const char *lip, const char *rip, uint16_t lport, uint16_t rport)
{
    uint32_t m = t->nslots - 1, i;
    i = toe_hash((const uint8_t *)lip, (const uint8_t *)rip, lport, rport) & m;
    for (uint32_t n = 0; n < t->nslots; n++, i = (i + 1) & m) {
        struct toe_slot *s = &t->slots[i];
        if (s->used == TOE_SLOT_EMPTY)
            return -1;
        if (toe_match(s, (const uint8_t *)lip, (const uint8_t *)rip, lport, rport)) {
            s->used = TOE_SLOT_DEAD;
            t->nused--;
            t->ndead++;
            return 0;
        }
    }
    return -1;
}

void toe_clear(struct toe *t)
{
    memset(t->slots, 0, sizeof(struct toe_slot) * t->nslots);
    t->nused = t->ndead = 0;
}

/* One's-complement sum, folded later. */
static uint32_t csum_add(uint32_t sum, const uint8_t *p, uint32_t len)
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

static uint16_t csum_fold(uint32_t sum)
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

static uint32_t csum_add64(uint64_t acc, const uint8_t *p, uint32_t len)
{
    if (len >= 64) {
        acc += csum_block(p, len);
        while (acc >> 32)
            acc = (acc & 0xffffffffu) + (acc >> 32);
        return (uint32_t)acc;
    }
    /* wider accumulator for long payloads: 32-bit words into 64 bits */
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

static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/*
 * A frame that passed the MAC filter: does it belong to an offloaded
 * connection?  1: taken by the TOE (queued or dropped), 0: normal path.
 * IP fragments, IPv4 options and IPv6 extension headers take the normal path.
 */
int toe_steer(struct toe *t, const uint8_t *f, uint32_t n, uint64_t *stats)
{
    uint8_t lip[16], rip[16];
    uint32_t ipoff = 14, tcpoff, tcplen, sum;
    uint16_t et;
    int v6;
    if (!t || !t->nused || n < 14 + 20 + 20)
        return 0;
    et = (uint16_t)(f[12] << 8 | f[13]);
    if (et == 0x0800) {
        const uint8_t *ip = f + ipoff;
        uint32_t tot = (uint32_t)(ip[2] << 8 | ip[3]);
        if (ip[0] != 0x45 || ip[9] != 6 || (ip[6] & 0x3f) || ip[7] || tot < 40 || tot > n - ipoff)
            return 0;
        memcpy(lip, v4mapped, 12);
        memcpy(lip + 12, ip + 16, 4);
        memcpy(rip, v4mapped, 12);
        memcpy(rip + 12, ip + 12, 4);
        tcpoff = ipoff + 20;
        tcplen = tot - 20;
        v6 = 0;
    } else if (et == 0x86DD) {
        const uint8_t *ip = f + ipoff;
        uint32_t plen;
        if (n < 14 + 40 + 20 || (ip[0] >> 4) != 6 || ip[6] != 6)
            return 0;
        plen = (uint32_t)(ip[4] << 8 | ip[5]);
        if (plen < 20 || plen > n - ipoff - 40)
            return 0;
        memcpy(lip, ip + 24, 16);
        memcpy(rip, ip + 8, 16);
        tcpoff = ipoff + 40;
        tcplen = plen;
        v6 = 1;
    } else {
        return 0;
    }
    const uint8_t *tcp = f + tcpoff;
    uint16_t sport = (uint16_t)(tcp[0] << 8 | tcp[1]), dport = (uint16_t)(tcp[2] << 8 | tcp[3]);
    uint32_t id = toe_lookup(t, lip, rip, dport, sport);
    if (!id)
        return 0;
    /* ours: verify the checksums */
    if (!v6 && csum_fold(csum_add(0, f + ipoff, 20)) != 0) {
        stats[STAT_OFFLOAD_CSUM_ERRORS]++;
        return 1;
    }
    if (v6) {
        sum = csum_add(0, f + ipoff + 8, 32);
    } else {
        sum = csum_add(0, f + ipoff + 12, 8);
    }
    sum += 6 + tcplen;
    if (csum_fold(csum_add64(sum, tcp, tcplen)) != 0) {
        stats[STAT_OFFLOAD_CSUM_ERRORS]++;
        return 1;
    }
    if (t->rx_count >= t->rx_cap) {
        stats[STAT_OFFLOAD_RX_OVERFLOW]++;
        return 1;
    }
    uint32_t k = t->rx_count++;
    memcpy(t->rx_buf + (uint64_t)k * TOE_RX_SLOT, f, n);
    t->rx_id[k] = id;
    t->rx_off[k] = tcpoff;
    t->rx_len[k] = tcplen;
    stats[STAT_OFFLOAD_SEGS_IN]++;
    return 1;
}

/*
 * Send one TCP segment of an offloaded connection.  `tcp` is the TCP header
 * with its options (checksum field ignored), `payload` the data.  ip16 are
 * 16-byte addresses (IPv4 as ::ffff:a.b.c.d).  Returns the frame length, or
 * -1 if it could not be built (too long) or written.
 */
int toe_xmit(struct toe *t, const char *dst_mac, const char *src_mac, int v6,
             const char *src_ip, const char *dst_ip, int ttl, int tos, uint32_t flow_label,
             const char *tcp, uint32_t hlen, const char *payload, uint32_t plen,
             int tap_fd, int pcap_fd, uint64_t *stats, uint8_t *scratch, struct impair *imp)
{
    uint32_t iph = v6 ? 40 : 20, tcplen = hlen + plen, flen = 14 + iph + tcplen, sum;
    uint8_t *f = scratch, *ip = scratch + 14, *th = scratch + 14 + iph;
    if (flen > MAX_FRAME || hlen < 20)
        return -1;
    memcpy(f, dst_mac, 6);
    memcpy(f + 6, src_mac, 6);
    if (v6) {
        f[12] = 0x86; f[13] = 0xDD;
        ip[0] = (uint8_t)(0x60 | ((tos >> 4) & 0x0f));
        ip[1] = (uint8_t)(((tos & 0x0f) << 4) | ((flow_label >> 16) & 0x0f));
        ip[2] = (uint8_t)(flow_label >> 8);
        ip[3] = (uint8_t)flow_label;
        ip[4] = (uint8_t)(tcplen >> 8);
        ip[5] = (uint8_t)tcplen;
        ip[6] = 6;
        ip[7] = (uint8_t)ttl;
        memcpy(ip + 8, src_ip, 16);
        memcpy(ip + 24, dst_ip, 16);
        sum = csum_add(0, ip + 8, 32);
    } else {
        uint16_t id = (uint16_t)(0x8000 | (t->ip_id++ & 0x7fff));
        uint32_t tot = 20 + tcplen;
        f[12] = 0x08; f[13] = 0x00;
        ip[0] = 0x45;
        ip[1] = (uint8_t)tos;
        ip[2] = (uint8_t)(tot >> 8);
        ip[3] = (uint8_t)tot;
        ip[4] = (uint8_t)(id >> 8);
        ip[5] = (uint8_t)id;
        ip[6] = 0x40;           /* DF: the NIC never fragments */
        ip[7] = 0;
        ip[8] = (uint8_t)ttl;
        ip[9] = 6;
        ip[10] = ip[11] = 0;
        memcpy(ip + 12, src_ip + 12, 4);
        memcpy(ip + 16, dst_ip + 12, 4);
        uint16_t c = csum_fold(csum_add(0, ip, 20));
        ip[10] = (uint8_t)(c >> 8);
        ip[11] = (uint8_t)c;
        sum = csum_add(0, ip + 12, 8);
    }
    memcpy(th, tcp, hlen);
    th[16] = th[17] = 0;
    if (plen)
        memcpy(th + hlen, payload, plen);
    sum += 6 + tcplen;
    uint16_t c = csum_fold(csum_add64(sum, th, tcplen));
    th[16] = (uint8_t)(c >> 8);
    th[17] = (uint8_t)c;
    int go = imp && tap_fd >= 0 ? impair_admit(imp, f, flen) : 1;
    ssize_t w = go != 1 ? (ssize_t)flen : tap_fd >= 0 ? write(tap_fd, f, flen) : -1;
    if (w != (ssize_t)flen) {
        stats[STAT_TX_DROPS]++;
        return -1;
    }
    stats[STAT_TX_FRAMES]++;
    stats[STAT_TX_BYTES] += flen;
    stats[STAT_OFFLOAD_SEGS_OUT]++;
    stats[STAT_OFFLOAD_BYTES_OUT] += plen;
    pcap_record(pcap_fd, f, flen);
    return (int)flen;
}

/*
 * A burst (segmentation offload): `plen` payload bytes leave as consecutive
 * segments of `mss` bytes (the last may be shorter) with the header `tcp`
 * repeated, the sequence number advanced per piece and PSH kept only on the
 * last piece.  Returns the number of frames written; a failed write counts as
 * a drop (as toe_xmit) and the rest still go (the peer sees a loss).
 */
int toe_xmit_burst(struct toe *t, const char *dst_mac, const char *src_mac, int v6,
                   const char *src_ip, const char *dst_ip, int ttl, int tos, uint32_t flow_label,
                   const char *tcp, uint32_t hlen, const char *payload, uint32_t plen, uint32_t mss,
                   int tap_fd, int pcap_fd, uint64_t *stats, uint8_t *scratch, struct impair *imp)
{
    char h[60];
    uint32_t seq0, off, sent = 0;
    uint8_t flags;
    if (hlen < 20 || hlen > 60 || !mss)
        return -1;
    memcpy(h, tcp, hlen);
    seq0 = (uint32_t)(uint8_t)h[4] << 24 | (uint32_t)(uint8_t)h[5] << 16
         | (uint32_t)(uint8_t)h[6] << 8 | (uint8_t)h[7];
    flags = (uint8_t)h[13];
    for (off = 0; off < plen; off += mss) {
        uint32_t n = plen - off < mss ? plen - off : mss;
        uint32_t seq = seq0 + off;
        h[4] = (char)(seq >> 24); h[5] = (char)(seq >> 16); h[6] = (char)(seq >> 8); h[7] = (char)seq;
        h[13] = (char)(off + n >= plen ? flags : (flags & ~0x08));
        if (toe_xmit(t, dst_mac, src_mac, v6, src_ip, dst_ip, ttl, tos, flow_label, h, hlen,
                     payload + off, n, tap_fd, pcap_fd, stats, scratch, imp) > 0)
            sent++;
    }
    return (int)sent;
}
