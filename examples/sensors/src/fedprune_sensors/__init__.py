"""fedprune example: activity recognition from wearable IMU recordings (CSV) with a GRU."""
