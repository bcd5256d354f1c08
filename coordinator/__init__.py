"""fedprune coordinator package."""
