"""The lab: simulation, attacks, a local federation on one host and the demo."""
