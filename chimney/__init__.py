"""chimney: an emulated TCP-offload (TCP Chimney) PCIe NIC, its miniport and host stack."""
__version__ = "0.1.0"
