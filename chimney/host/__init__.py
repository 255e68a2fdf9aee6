"""Host side of chimney: running the guest VM (see :mod:`chimney.host.qemu`)."""
