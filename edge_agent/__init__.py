"""fedprune edge_agent package."""
