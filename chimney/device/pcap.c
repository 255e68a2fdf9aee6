/*
 * The wire capture's records: pcapng Enhanced Packet Blocks (docs/pcap.md).
 * The file's Section Header Block and Interface Description Blocks are
 * written by PcapWriter (chimney/device/wire.py) before the fd reaches C;
 * here each frame becomes one block, written with one writev: the block
 * header, the frame (cut to the file's snap length), then padding, the
 * epb_flags option (direction) and the trailing block length.  The
 * interface a block names says who put the frame on the wire: the peer,
 * the host stack's plain TX ring or the TOE.
 */
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "fastpath.h"

#define EPB_TYPE 6u
#define EPB_FLAGS_INBOUND 1u
#define EPB_FLAGS_OUTBOUND 2u
#define OPT_EPB_FLAGS 2u
#define DEFAULT_SNAPLEN 65535u

static struct { int fd; uint32_t snaplen; } capture[PCAP_MAX_FDS];
static int n_capture;

/* Register fd as a capture cut to snaplen bytes a frame (on) or forget it.
 * 0, or -1 if the table is full or snaplen is 0. */
int fp_pcap_open(int fd, uint32_t snaplen, int on)
{
    if (on && !snaplen)
        return -1;
    for (int i = 0; i < n_capture; i++)
        if (capture[i].fd == fd) {
            if (on)
                capture[i].snaplen = snaplen;
            else
                capture[i] = capture[--n_capture];
            return 0;
        }
    if (!on)
        return 0;
    if (n_capture >= PCAP_MAX_FDS)
        return -1;
    capture[n_capture].fd = fd;
    capture[n_capture++].snaplen = snaplen;
    return 0;
}

static uint32_t snaplen_of(int fd)
{
    for (int i = 0; i < n_capture; i++)
        if (capture[i].fd == fd)
            return capture[i].snaplen;
    return DEFAULT_SNAPLEN;
}

void pcap_record(int fd, int iface, const uint8_t *frame, uint32_t len)
{
    struct timespec ts;
    uint32_t hdr[7], tail[4];
    struct iovec iov[3];
    if (fd < 0)
        return;
    uint32_t snap = snaplen_of(fd), cap = len < snap ? len : snap, pad = (4 - (cap & 3)) & 3;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    uint32_t total = (uint32_t)sizeof(hdr) + cap + pad + (uint32_t)sizeof(tail);
    hdr[0] = EPB_TYPE;
    hdr[1] = total;
    hdr[2] = (uint32_t)iface;
    hdr[3] = (uint32_t)(ns >> 32);
    hdr[4] = (uint32_t)ns;
    hdr[5] = cap;
    hdr[6] = len;
    tail[0] = OPT_EPB_FLAGS | 4u << 16;     /* code, then length, 16 bits each */
    tail[1] = iface == PCAP_IF_PEER ? EPB_FLAGS_INBOUND : EPB_FLAGS_OUTBOUND;
    tail[2] = 0;                            /* opt_endofopt */
    tail[3] = total;
    iov[0].iov_base = hdr;
    iov[0].iov_len = sizeof(hdr);
    iov[1].iov_base = (void *)frame;
    iov[1].iov_len = cap;
    /* the padding's zeros and the options go out in one more piece */
    uint8_t end[4 + sizeof(tail)];
    memset(end, 0, pad);
    memcpy(end + pad, tail, sizeof(tail));
    iov[2].iov_base = end;
    iov[2].iov_len = pad + sizeof(tail);
    (void)!writev(fd, iov, 3);
}
