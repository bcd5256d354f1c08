"""fedprune protocol package."""
