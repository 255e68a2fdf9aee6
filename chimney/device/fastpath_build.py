"""cffi (API mode) build of the device's C fast path: chimney.device._fastpath.

The C source includes a header generated from chimney/hw.py, so descriptor
layouts and status bits have one definition.  Built by the package's own build
(setup.py's cffi_modules), or on demand by `python -m chimney.device.fastpath_build`.
"""
import importlib.util
import pathlib
import sys

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def _hw_header() -> str:
    # Load chimney/hw.py by path: at build time the package may not be importable.
    spec = importlib.util.spec_from_file_location("_chimney_hw", HERE.parent / "hw.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod       # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.c_header()


def _source() -> str:
    # fastpath.c's includes first, then the impairment (it needs them), then the rest.
    fast = (HERE / "fastpath.c").read_text()
    cut = fast.index("/* DESC layout")
    # toe.c (the offload fast path) after pcap_record, before the RX path that steers to it.
    cut2 = fast.index("static uint8_t *ring_desc")
    return (_hw_header() + fast[:cut] + (HERE / "impair.c").read_text() + fast[cut:cut2]
            + (HERE / "toe.c").read_text() + fast[cut2:])


CDEF = """
struct toe_slot { uint8_t lip[16]; uint8_t rip[16]; uint16_t lport, rport; uint32_t id; uint32_t used; };
struct toe { uint32_t nslots; uint32_t nused, ndead; struct toe_slot *slots;
             uint32_t rx_cap, rx_count; uint32_t *rx_id; uint32_t *rx_off; uint32_t *rx_len;
             uint8_t *rx_buf; uint16_t ip_id; uint16_t pad; };
struct dma_region { uint64_t iova; uint64_t len; uint8_t *host; uint32_t writable; uint32_t pad; };
struct dma_table { uint32_t n; struct dma_region *r; };
struct fp_queue { uint64_t base; uint32_t size; uint32_t head; uint32_t max_frame;
                  uint32_t error; uint32_t completed; uint32_t qid; uint64_t err_addr; };
uint8_t *dma_ptr(const struct dma_table *t, uint64_t addr, uint64_t len, int write);
int dma_copy(const struct dma_table *t, uint64_t addr, uint8_t *buf, uint64_t len, int to_guest);
struct held_frame { uint64_t due; uint32_t seq; uint32_t len; uint8_t data[...]; };
struct impair { uint32_t loss_ppm; uint32_t reorder_ppm; uint64_t delay_us; uint64_t jitter_us;
                uint64_t rng; uint32_t cap, count, seq, pad; struct held_frame *line;
                uint64_t passed, lost, reordered, delayed, overflow; };
uint64_t impair_now_us(void);
uint64_t impair_next_due(const struct impair *im);
int fp_impair_tx_flush(struct impair *im, int tap_fd);
int fp_impair_rx_flush(struct impair *im, const struct dma_table *t, struct fp_queue *q,
                       uint32_t tail, int pcap_fd, uint64_t *stats, const uint8_t *mac, int promisc,
                       struct toe *toe);
int fp_tx(const struct dma_table *t, struct fp_queue *q, uint32_t tail, int tap_fd,
          int pcap_fd, uint64_t *stats, uint8_t *scratch, int budget, struct impair *imp);
int fp_install_guard(void);
extern uint64_t fp_guard_faults;
int fp_rx(const struct dma_table *t, struct fp_queue *q, uint32_t tail, int tap_fd,
          int pcap_fd, uint64_t *stats, uint8_t *scratch, const uint8_t *mac,
          int promisc, int budget, struct impair *imp, struct toe *toe);
int toe_add(struct toe *t, const char *lip, const char *rip, uint16_t lport, uint16_t rport, uint32_t id);
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
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "chimney.device._fastpath",
    _source(),
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent.parent), verbose=False)
