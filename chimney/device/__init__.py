"""The emulated chimney NIC: vfio-user server, PCI function, queues, wire."""
