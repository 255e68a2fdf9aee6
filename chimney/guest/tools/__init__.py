"""The traffic tools: perf (sha256-verified bulk transfers), iperf3 (iperf3's own
protocol) and rr (request/response), on the host stack's sockets or on kernel
sockets, with what they share: the stacks (stacks.py), blocking helpers over
their non-blocking connections (conn.py), the CPU meter (cpu.py), the server
loop (server.py), the size and value parsers (values.py) and the command-line
options (options.py).  Standard library only: the guest has nothing else."""
