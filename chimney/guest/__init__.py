"""What runs in the guest: the miniport, its buses, (later) the host stack."""
