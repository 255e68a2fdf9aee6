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

static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* A frame's 4-tuple as the offload table keys it, and where its TCP segment is.
 * 0, or -1 if it is not TCP the TOE takes (IP fragments, IPv4 options and
 * IPv6 extension headers take the normal path). */
static int toe_parse(const uint8_t *f, uint32_t n, uint8_t *lip, uint8_t *rip,
                     uint32_t *tcpoff, uint32_t *tcplen, int *v6)
{
    uint32_t ipoff = 14;
    uint16_t et;
    if (n < 14 + 20 + 20)
        return -1;
    et = (uint16_t)(f[12] << 8 | f[13]);
    if (et == 0x0800) {
        const uint8_t *ip = f + ipoff;
        uint32_t tot = (uint32_t)(ip[2] << 8 | ip[3]);
        if (ip[0] != 0x45 || ip[9] != 6 || (ip[6] & 0x3f) || ip[7] || tot < 40 || tot > n - ipoff)
            return -1;
        memcpy(lip, v4mapped, 12);
        memcpy(lip + 12, ip + 16, 4);
        memcpy(rip, v4mapped, 12);
        memcpy(rip + 12, ip + 12, 4);
        *tcpoff = ipoff + 20;
        *tcplen = tot - 20;
        *v6 = 0;
    } else if (et == 0x86DD) {
        const uint8_t *ip = f + ipoff;
        uint32_t plen;
        if (n < 14 + 40 + 20 || (ip[0] >> 4) != 6 || ip[6] != 6)
            return -1;
        plen = (uint32_t)(ip[4] << 8 | ip[5]);
        if (plen < 20 || plen > n - ipoff - 40)
            return -1;
        memcpy(lip, ip + 24, 16);
        memcpy(rip, ip + 8, 16);
        *tcpoff = ipoff + 40;
        *tcplen = plen;
        *v6 = 1;
    } else {
        return -1;
    }
    return 0;
}

static uint32_t toe_frame_id(const struct toe *t, const uint8_t *f, uint8_t *lip, uint8_t *rip,
                             uint32_t tcpoff)
{
    const uint8_t *tcp = f + tcpoff;
    uint16_t sport = (uint16_t)(tcp[0] << 8 | tcp[1]), dport = (uint16_t)(tcp[2] << 8 | tcp[3]);
    return toe_lookup(t, lip, rip, dport, sport);
}

int toe_owns(const struct toe *t, const uint8_t *f, uint32_t n)
{
    uint8_t lip[16], rip[16];
    uint32_t tcpoff, tcplen;
    int v6;
    if (!t || !t->nused || toe_parse(f, n, lip, rip, &tcpoff, &tcplen, &v6))
        return 0;
    return toe_frame_id(t, f, lip, rip, tcpoff) != 0;
}

uint32_t toe_rx_room(const struct toe *t)
{
    uint64_t cap = (uint64_t)t->rx_cap * TOE_RX_SLOT, used = t->rx_count ? t->rx_used : 0;
    if (t->rx_count >= t->rx_cap || used >= cap)
        return 0;
    return (uint32_t)(cap - used);
}

/*
 * A frame that passed the MAC filter: does it belong to an offloaded
 * connection?  1: taken by the TOE (queued or dropped), 0: normal path.
 * The frame may be a super-segment (up to 64 KB, the kernel's GRO/GSO): the
 * engine takes a segment of any length its window allows.
 */
int toe_steer(struct toe *t, const uint8_t *f, uint32_t n, uint64_t *stats, int csum_ok)
{
    uint8_t lip[16], rip[16];
    uint32_t ipoff = 14, tcpoff, tcplen, sum, id;
    int v6;
    if (!t || !t->nused || toe_parse(f, n, lip, rip, &tcpoff, &tcplen, &v6))
        return 0;
    id = toe_frame_id(t, f, lip, rip, tcpoff);
    if (!id)
        return 0;
    /* ours: verify the checksums, unless the kernel vouched for them */
    if (!csum_ok) {
        if (!v6 && csum_fold(csum_add(0, f + ipoff, 20)) != 0) {
            stats[STAT_OFFLOAD_CSUM_ERRORS]++;
            return 1;
        }
        sum = v6 ? csum_add(0, f + ipoff + 8, 32) : csum_add(0, f + ipoff + 12, 8);
        sum += 6 + tcplen;
        if (csum_fold(csum_add64(sum, f + tcpoff, tcplen)) != 0) {
            stats[STAT_OFFLOAD_CSUM_ERRORS]++;
            return 1;
        }
    }
    if (toe_rx_room(t) < n) {
        stats[STAT_OFFLOAD_RX_OVERFLOW]++;
        return 1;
    }
    if (!t->rx_count)
        t->rx_used = 0;
    uint32_t k = t->rx_count++, at = t->rx_used;
    memcpy(t->rx_buf + at, f, n);
    t->rx_used = at + ((n + 63) & ~63u);
    t->rx_id[k] = id;
    t->rx_off[k] = at + tcpoff;
    t->rx_len[k] = tcplen;
    stats[STAT_OFFLOAD_SEGS_IN]++;
    return 1;
}

/*
 * Ethernet + IP + TCP headers of an offloaded connection's segment into f,
 * for tcplen TCP bytes (header + payload); the TCP checksum field is zeroed.
 * An IPv4 datagram takes `nids` identifications (one per segment the wire
 * will carry), all in the upper half of the range.  Returns the pseudo-header
 * sum (TCP length included).
 */
static uint32_t build_headers(struct toe *t, uint8_t *f, const char *dst_mac, const char *src_mac,
                              int v6, const char *src_ip, const char *dst_ip, int ttl, int tos,
                              uint32_t flow_label, const char *tcp, uint32_t hlen, uint32_t tcplen,
                              uint32_t nids)
{
    uint32_t iph = v6 ? 40 : 20, sum;
    uint8_t *ip = f + 14, *th = f + 14 + iph;
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
        /* the kernel numbers a super-segment's pieces id, id + 1, ...: keep them
         * all in the upper half */
        if ((t->ip_id & 0x7fff) + nids > 0x8000)
            t->ip_id = 0;
        uint16_t id = (uint16_t)(0x8000 | (t->ip_id & 0x7fff));
        uint32_t tot = 20 + tcplen;
        t->ip_id = (uint16_t)(t->ip_id + nids);
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
    return sum + 6 + tcplen;
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
    uint8_t *f = scratch, *th = scratch + 14 + iph;
    if (flen > MAX_FRAME || hlen < 20)
        return -1;
    sum = build_headers(t, f, dst_mac, src_mac, v6, src_ip, dst_ip, ttl, tos, flow_label,
                        tcp, hlen, tcplen, 1);
    if (plen)
        memcpy(th + hlen, payload, plen);
    uint16_t c = csum_fold(csum_add64(sum, th, tcplen));
    th[16] = (uint8_t)(c >> 8);
    th[17] = (uint8_t)c;
    int go = imp && tap_fd >= 0 ? impair_admit(imp, f, flen) : 1;
    ssize_t w = go != 1 ? (ssize_t)flen : wire_write(tap_fd, f, flen);
    if (w != (ssize_t)flen) {
        stats[STAT_TX_DROPS]++;
        return -1;
    }
    stats[STAT_TX_FRAMES]++;
    stats[STAT_TX_BYTES] += flen;
    stats[STAT_OFFLOAD_SEGS_OUT]++;
    stats[STAT_OFFLOAD_BYTES_OUT] += plen;
    pcap_record(pcap_fd, PCAP_IF_TOE, f, flen);
    return (int)flen;
}

/*
 * A burst through the TAP's segmentation offload: up to 64 KB of payload per
 * write, behind a virtio-net header asking the kernel for TCP segments of
 * `mss` (gso_size) and for their checksums (NEEDS_CSUM: the TCP checksum
 * field holds the pseudo-header sum).  The pcap gets the segments the kernel
 * will make.  Returns the segments sent.
 */
static int burst_gso(struct toe *t, const char *dst_mac, const char *src_mac, int v6,
                     const char *src_ip, const char *dst_ip, int ttl, int tos, uint32_t flow_label,
                     char *h, uint32_t hlen, const char *payload, uint32_t plen, uint32_t mss,
                     uint32_t per, int tap_fd, int pcap_fd, uint64_t *stats, uint8_t *scratch)
{
    uint32_t iph = v6 ? 40 : 20, l4 = 14 + iph, hl = l4 + hlen, seq0, off, sent = 0;
    uint8_t flags = (uint8_t)h[13];
    struct tcp_frame p = {l4, hl, 0, v6};
    seq0 = (uint32_t)(uint8_t)h[4] << 24 | (uint32_t)(uint8_t)h[5] << 16
         | (uint32_t)(uint8_t)h[6] << 8 | (uint8_t)h[7];
    for (off = 0; off < plen;) {
        uint32_t chunk = plen - off < per * mss ? plen - off : per * mss;
        uint32_t nseg = (chunk + mss - 1) / mss, seq = seq0 + off;
        struct vnet_hdr vh;
        h[4] = (char)(seq >> 24); h[5] = (char)(seq >> 16); h[6] = (char)(seq >> 8); h[7] = (char)seq;
        h[13] = (char)(off + chunk >= plen ? flags : (flags & ~(TCP_PSH | TCP_FIN)));
        if (off)
            h[13] = (char)((uint8_t)h[13] & ~TCP_CWR);
        uint32_t sum = build_headers(t, scratch, dst_mac, src_mac, v6, src_ip, dst_ip, ttl, tos,
                                     flow_label, h, hlen, hlen + chunk, nseg);
        uint16_t pseudo = (uint16_t)~csum_fold(sum);
        scratch[l4 + 16] = (uint8_t)(pseudo >> 8);
        scratch[l4 + 17] = (uint8_t)pseudo;
        memset(&vh, 0, sizeof(vh));
        vh.flags = VNET_F_NEEDS_CSUM;
        vh.csum_start = (uint16_t)l4;
        vh.csum_offset = 16;
        vh.hdr_len = (uint16_t)hl;
        if (nseg > 1) {
            vh.gso_type = (uint8_t)((v6 ? VNET_GSO_TCPV6 : VNET_GSO_TCPV4)
                                    | ((uint8_t)h[13] & TCP_CWR ? VNET_GSO_ECN : 0));
            vh.gso_size = (uint16_t)mss;
        }
        if (wire_write_gso(tap_fd, &vh, scratch, hl, (const uint8_t *)payload + off, chunk) == 0) {
            stats[STAT_TX_FRAMES] += nseg;
            stats[STAT_TX_BYTES] += (uint64_t)nseg * hl + chunk;
            stats[STAT_OFFLOAD_SEGS_OUT] += nseg;
            stats[STAT_OFFLOAD_BYTES_OUT] += chunk;
            if (nseg > 1)
                stats[STAT_WIRE_TSO_OUT]++;
            sent += nseg;
            pcap_record_segments(pcap_fd, PCAP_IF_TOE, scratch, &p, (const uint8_t *)payload + off, chunk, mss);
        } else {
            stats[STAT_TX_DROPS] += nseg;
        }
        off += chunk;
    }
    return (int)sent;
}

/*
 * A burst (segmentation offload): `plen` payload bytes leave as consecutive
 * segments of `mss` bytes (the last may be shorter) with the header `tcp`
 * repeated, the sequence number advanced per piece and PSH (and FIN) kept
 * only on the last piece.  On a TAP with the virtio-net header and a clean
 * link the kernel cuts them (burst_gso); an impaired link or a plain TAP gets
 * them one by one, so loss, delay and reordering act per segment.  Returns
 * the number of segments sent; a failed write counts as a drop (as toe_xmit)
 * and the rest still go (the peer sees a loss).
 */
int toe_xmit_burst(struct toe *t, const char *dst_mac, const char *src_mac, int v6,
                   const char *src_ip, const char *dst_ip, int ttl, int tos, uint32_t flow_label,
                   const char *tcp, uint32_t hlen, const char *payload, uint32_t plen, uint32_t mss,
                   int tap_fd, int pcap_fd, uint64_t *stats, uint8_t *scratch, struct impair *imp)
{
    char h[60];
    uint32_t seq0, off, sent = 0, iph = v6 ? 40 : 20;
    uint8_t flags;
    if (hlen < 20 || hlen > 60 || !mss || 14 + iph + hlen + mss > MAX_FRAME)
        return -1;
    memcpy(h, tcp, hlen);
    /* segments per write: the IP datagram's length field caps it at 64 KB */
    uint32_t per = (65535 - (v6 ? 0 : 20) - hlen) / mss;
    if (!imp && tap_fd >= 0 && wire_is_vnet(tap_fd) && per >= 2)
        return burst_gso(t, dst_mac, src_mac, v6, src_ip, dst_ip, ttl, tos, flow_label, h, hlen,
                         payload, plen, mss, per, tap_fd, pcap_fd, stats, scratch);
    seq0 = (uint32_t)(uint8_t)h[4] << 24 | (uint32_t)(uint8_t)h[5] << 16
         | (uint32_t)(uint8_t)h[6] << 8 | (uint8_t)h[7];
    flags = (uint8_t)h[13];
    for (off = 0; off < plen; off += mss) {
        uint32_t n = plen - off < mss ? plen - off : mss;
        uint32_t seq = seq0 + off;
        h[4] = (char)(seq >> 24); h[5] = (char)(seq >> 16); h[6] = (char)(seq >> 8); h[7] = (char)seq;
        h[13] = (char)(off + n >= plen ? flags : (flags & ~(TCP_PSH | TCP_FIN)));
        if (off)
            h[13] = (char)((uint8_t)h[13] & ~TCP_CWR);
        if (toe_xmit(t, dst_mac, src_mac, v6, src_ip, dst_ip, ttl, tos, flow_label, h, hlen,
                     payload + off, n, tap_fd, pcap_fd, stats, scratch, imp) > 0)
            sent++;
    }
    return (int)sent;
}
