"""Operating a fleet: PKI, enrollment, provisioning, the broker's configuration and the device registry."""
