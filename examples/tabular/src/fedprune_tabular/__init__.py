"""fedprune example: hourly building energy use (kWh) regressed from site CSV tables with an MLP."""
