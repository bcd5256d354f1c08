"""fedprune example: shape recognition on PNG image folders with a MobileNet-style CNN."""
